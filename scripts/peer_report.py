"""The JSON report of ``scripts/bench_peers.py`` (issue 20 item 7): its row schema, reading and checking an existing
report, keeping the part of it a run does not measure, and writing it whole (through a temporary file). The format
and the options that merge runs are described in bench_peers' docstring."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

# scripts/ on path (now: re-exported to bench_peers)
from bench_moe import COMPILE_MODES, now, user_error, write_json

LAYER_KEYS = (
    *("impl", "E", "F", "K", "T", "routing", "graph_ratio", "wall_ratio", "peak_mem_ratio"),
    *("graph_ms", "wall_ms", "fwd_ms", "peak_mem_mib", "host_ms", "graph_error"),
    *("dense_graph_ms", "dense_wall_ms", "dense_fwd_ms", "dense_peak_mem_mib", "dense_host_ms"),
)
E2E_KEYS = ("model", "compiled", "tokens_per_s", "ratio")
ROUTINGS = ("balanced", "zipf")  # a layer row's routing
# a (shape, routing) group of layer rows, as layer_pending lists it
GROUP_KEYS = ("E", "F", "K", "T", "routing")


def e2e_row(measured: dict) -> dict:
    """One JSON e2e row (exactly ``E2E_KEYS``) from a row of ``bench_moe.bench_e2e``."""
    return {k: measured[k] for k in E2E_KEYS}


def layer_row(impl, E, Fw, K, T, kind, res: dict, dense: dict) -> dict:
    """One JSON layer row (exactly ``LAYER_KEYS``) from the measurements ``res`` of ``impl`` and ``dense``'s."""
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    row = dict(impl=impl, E=E, F=Fw, K=K, T=T, routing=kind)
    row |= dict(
        graph_ratio=ratio(res["graph_ms"], dense["graph_ms"]),
        wall_ratio=ratio(res["wall_ms"], dense["wall_ms"]),
        peak_mem_ratio=ratio(res["peak_mem_mib"], dense["peak_mem_mib"]),
    )
    row |= {
        k: res.get(k) for k in ("graph_ms", "wall_ms", "fwd_ms", "peak_mem_mib", "host_ms", "graph_error")
    }
    row |= {f"dense_{k}": dense.get(k) for k in ("graph_ms", "wall_ms", "fwd_ms", "peak_mem_mib", "host_ms")}
    return row


def build_report(gpu: str, layer: list[dict], e2e: list[dict]) -> dict:
    """``{"gpu", "date": now, "layer", "e2e"}``; AssertionError for a row without exactly its schema's keys."""
    for r in layer:
        assert set(r) == set(LAYER_KEYS), sorted(set(r) ^ set(LAYER_KEYS))
    for r in e2e:
        assert set(r) == set(E2E_KEYS), sorted(set(r) ^ set(E2E_KEYS))
    return {"gpu": gpu, "date": now(), "layer": layer, "e2e": e2e}


def partial_path(path: str) -> Path:
    """Where a layer run keeps its report while it measures: ``--json``'s name with ``.partial`` before its suffix
    (``h200.json`` -> ``h200.partial.json``)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.partial{p.suffix}")


OPTIONAL_LAYER_KEYS = ("host_ms", "dense_host_ms")  # reports written before host_ms was measured lack them


def read_report(path: Path, name: str | None = None) -> dict | None:
    """An existing report at ``path`` (None when there is none), checked: ``layer`` and ``e2e`` lists of rows with
    exactly ``LAYER_KEYS`` / ``E2E_KEYS`` (rows of older reports get None for ``OPTIONAL_LAYER_KEYS``), ``compiled``
    false or a mode, ISO dates (``date``; ``layer_date`` and ``e2e_dates`` where present); anything else is one
    ``error:`` line, naming the file as ``name`` (default: ``--json PATH``)."""
    name = name or f"--json {path}"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        gpu, layer, e2e = old["gpu"], old["layer"], old["e2e"]
        if not (isinstance(layer, list) and isinstance(e2e, list)):
            raise TypeError("'layer' and 'e2e' must be lists")
        if not all(isinstance(r, dict) for r in (*layer, *e2e)):
            raise TypeError("rows must be JSON objects")
        _check_names(layer, e2e)
        _check_dates(old)
        _check_pending(old.get("layer_pending", []))
        layer = [{k: None for k in OPTIONAL_LAYER_KEYS} | r for r in layer]
        bad = [(r, LAYER_KEYS, "layer") for r in layer if set(r) != set(LAYER_KEYS)]
        bad += [(r, E2E_KEYS, "e2e") for r in e2e if set(r) != set(E2E_KEYS)]
    except (OSError, ValueError, KeyError, TypeError, RecursionError, MemoryError) as e:
        user_error(f"{name}: not a bench_peers report ({e!r}); move it away to start a new one")
    if bad:
        row, keys, part = bad[0]
        missing, extra = sorted(set(keys) - set(row)), sorted(set(row) - set(keys))
        article = "an" if part == "e2e" else "a"
        user_error(f"{name}: {article} {part} row with keys missing {missing} and unknown {extra}")
    return old | {"gpu": gpu, "layer": layer, "e2e": e2e}


def _check_dates(old: dict) -> None:
    """TypeError or ValueError unless ``date`` is an ISO date, ``layer_date`` (and the older ``e2e_date``) one or
    null, ``e2e_dates`` (where present) a mapping of compile modes to ISO dates."""
    optional = [old[k] for k in ("layer_date", "e2e_date") if old.get(k) is not None]
    dates = [old["date"], *optional]
    by_mode = old.get("e2e_dates", {})
    if not isinstance(by_mode, dict):
        raise TypeError("'e2e_dates' must map compile modes to dates")
    for value in (*dates, *by_mode.values()):
        datetime.datetime.fromisoformat(value)  # TypeError for a non-string


def _check_names(layer: list[dict], e2e: list[dict]) -> None:
    """TypeError unless the keys that name a row are of their kind: a layer row's ``impl`` and ``routing``
    strings and E, F, K, T positive integers (where present), an e2e row's ``model`` a string and its ``compiled``
    false or a torch.compile mode (``COMPILE_MODES``)."""
    for r in layer:
        sizes = [r[k] for k in GROUP_KEYS[:4] if k in r]
        if not _positive_ints(sizes):
            raise TypeError(f"a layer row's E, F, K, T must be positive integers, not {sizes}")
        if not all(isinstance(r[k], str) for k in ("impl", "routing") if k in r):
            raise TypeError("a layer row's 'impl' and 'routing' must be strings")
    if not all(isinstance(r.get("model", ""), str) for r in e2e):
        raise TypeError("an e2e row's 'model' must be a string")
    if not all("compiled" not in r or r["compiled"] is False or r["compiled"] in COMPILE_MODES for r in e2e):
        raise TypeError(f"an e2e row's 'compiled' must be false or one of {', '.join(COMPILE_MODES)}")


def _positive_ints(values: list) -> bool:
    """Are all ``values`` positive integers (JSON numbers without a fraction, not booleans)?"""
    return all(type(n) is int and n > 0 for n in values)


def _check_pending(pending) -> None:
    """TypeError unless ``pending`` (a report's ``layer_pending``) is a list of distinct ``pending_groups``
    entries: E, F, K, T positive integers, routing "balanced" or "zipf"."""

    def group(g) -> bool:
        ints = _positive_ints([g.get(k) for k in GROUP_KEYS[:4]])
        return set(g) == set(GROUP_KEYS) and ints and g["routing"] in ROUTINGS

    if not isinstance(pending, list) or not all(isinstance(g, dict) and group(g) for g in pending):
        raise TypeError(
            "'layer_pending' must be a list of objects {E, F, K, T: positive integers, routing: balanced or zipf}"
        )
    if len({tuple(g.values()) for g in pending}) != len(pending):
        raise TypeError("'layer_pending' lists a group twice")


def mode_key(row: dict) -> str:
    """The key of an e2e row's compile mode in ``e2e_dates``."""
    return row["compiled"] or "uncompiled"


def e2e_dates(old: dict) -> dict[str, str]:
    """When each compile mode's e2e rows of report ``old`` were measured: its ``e2e_dates``, else (reports written
    before them) its ``e2e_date`` or ``date`` for every mode it has rows of."""
    before = old.get("e2e_date", old.get("date"))  # e2e_date: one date for all, before e2e_dates
    return {m: old.get("e2e_dates", {}).get(m, before) for m in dict.fromkeys(map(mode_key, old["e2e"]))}


EMPTY_REPORT = {"layer": [], "e2e": []}


def refuse_other_gpu(path: str, old: dict, kept: list[dict], gpu: str) -> None:
    """An error line, before any measurement, where the rows ``kept`` of report ``old`` at ``path`` (by
    ``--e2e-only`` or ``--layer-only``) are from another GPU than ``gpu``."""
    if kept and old["gpu"] != gpu:
        user_error(f"--json {path}: rows it would keep are from {old['gpu']!r}, this is {gpu!r}")


def refuse_dropped_layer_rows(path: str, old: dict, groups: list[dict], impls: list[str], why: str) -> None:
    """A run that replaces the layer rows of report ``old`` at ``path`` (``why``: how it does): an error line,
    before any measurement, where it would drop rows that it (its (shape, routing) ``groups`` and ``impls``)
    does not measure again."""
    measured = {(*(g[k] for k in GROUP_KEYS), i) for g in groups for i in impls}
    dropped = [r for r in old["layer"] if (*(r[k] for k in GROUP_KEYS), r["impl"]) not in measured]
    if dropped:
        what = list(dict.fromkeys(f"{r['impl']} E={r['E']} F={r['F']} K={r['K']} T={r['T']} {r['routing']}"
                                  for r in dropped))  # fmt: skip
        user_error(
            f"--json {path}: {why} and would drop {len(dropped)} of its layer rows that this run does not measure"
            f" ({_some(what)}): measure them too (--shapes, --routing, --impls), or give another --json"
        )


def refuse_dropped_e2e_rows(
    path: str, old: dict, measured_modes: list | None, models: list[str], keeps_other_modes: bool, why: str
) -> None:
    """A run that replaces e2e rows of report ``old`` at ``path`` (``why``: how it does): an error line, before
    any measurement, where it would drop a row that it does not measure again. It measures ``models`` (the
    variants; a graphed one only uncompiled, dense always) in each of ``measured_modes`` (rows' ``compiled``
    values: False, compile modes; None: no e2e rows at all); ``keeps_other_modes`` (``--e2e-only``): the rows of
    the modes it does not measure stay, else (a plain run) none stays."""

    def safe(r: dict) -> bool:
        if measured_modes is None or r["compiled"] not in measured_modes:
            return keeps_other_modes
        graphed = r["model"].endswith("graphed")
        return r["model"] == "dense" or (r["model"] in models and not (r["compiled"] and graphed))

    dropped = [r for r in old["e2e"] if not safe(r)]
    if dropped:
        what = list(dict.fromkeys(f"{r['model']!r} ({mode_key(r)})" for r in dropped))
        user_error(
            f"--json {path}: {why} and would drop {_some(what)}: measure them too (--e2e MODEL ..., --compile"
            " MODE ..., without --skip-uncompiled for the uncompiled ones), or give another --json"
        )


def _some(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``names``, comma-separated, with how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def kept_notes(old: dict) -> dict:
    """A report's top-level keys beyond those ``write_report`` writes (notes added by hand): kept as they are."""
    # e2e_date: before e2e_dates
    written = ("gpu", "date", "layer", "e2e", "layer_date", "e2e_dates", "e2e_date", "layer_pending")
    return {k: v for k, v in old.items() if k not in written}


def keep_e2e(path: str, old: dict, gpu: str, layer: list[dict], layer_date: str, pending: list[dict]) -> None:
    """``--layer-only``: the new layer rows (``pending``: the groups not measured yet) written into the report
    ``old`` at ``path``, with its e2e rows, their ``e2e_dates`` and its other top-level keys kept."""
    write_report(path, gpu, layer, old["e2e"], layer_date, kept_notes(old), e2e_dates(old), pending)


def write_report(
    path: str | None,
    gpu: str,
    layer: list[dict],
    e2e: list[dict],
    layer_date: str | None,
    extra: dict | None = None,
    kept_dates: dict[str, str] | None = None,
    pending: list[dict] | None = None,
) -> None:
    """``build_report`` (plus ``layer_date``: when the layer rows were measured, None without any; ``e2e_dates``:
    when each compile mode's e2e rows were, ``kept_dates`` for rows kept from an earlier report, the report's
    ``date`` for the others; ``layer_pending``: the (shape, routing) groups the run has still to measure, only
    while there are any; and ``extra`` top-level keys) to ``path`` (nothing when None), through a temporary
    file: a run cut short leaves the last complete write."""
    if path is None:
        return
    report = build_report(gpu, layer, e2e)
    dates = {m: (kept_dates or {}).get(m, report["date"]) for m in dict.fromkeys(map(mode_key, e2e))}
    report |= {"layer_date": layer_date, "e2e_dates": dates} | ({"layer_pending": pending} if pending else {})
    write_json(path, (extra or {}) | report)
    left = f", {len(pending)} (shape, routing) groups pending" if pending else ""
    print(f"wrote {path} ({len(layer)} layer rows, {len(e2e)} e2e rows{left})", flush=True)
