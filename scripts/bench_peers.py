"""Peer benchmark of the experts layer (issue 20, items 4 and 7): this project's backends side by side with
ScatterMoE, a Hugging Face-style grouped_mm and a naive loop, against the dense GPT-2 MLP, on one CUDA GPU.
(Run on the H200 2026-11-30 22:50 UTC: docs/benchmarks.md, "Peers on the H200"; CPU test: tests/test_bench_peers.py.)

Shapes (legend: docs/architecture.md): T tokens, D = 768, F expert width, E experts, K experts per token.
Each expert is GPT-2's MLP (D -> F -> D with biases, GELU-tanh), bf16, forward+backward. Implementations
(``--impls``), all called as ``fn(x_TD, w1, b1, w2, b2, indices_TK, weights_TK, activation) -> y_TD``:

- ``triton``, ``grouped_mm``: this project's backends (``moe_emergence.experts.get_backend``).
- ``scattermoe``: ScatterMoE v0.3 (github.com/shawntan/scattermoe, Apache-2.0; the peers' code is in
  ``scripts/peer_impls.py``) as shipped: its
  ``flatten_sort_count`` and two ``parallel_linear`` calls with biases, as its ``scattermoe.mlp.MLP`` does (the
  routing weights enter as bf16 ``gates``, as in its MLP). Imported from a git-ignored copy of its Python package
  at ``<repo>/.gl/scattermoe/`` (``.gl/scattermoe/__init__.py``), never committed here. Our weights are put into
  its layout (``ParallelExperts.weight`` ``[E, out, in]``) once, outside the timed region.
- ``scattermoe_histc``: the same ScatterMoE kernels, with the expert sort/count done by ``torch.sort`` +
  ``torch.histc`` instead of its ``bincount`` (a host sync that stops CUDA-graph capture): a variant written
  here so that ScatterMoE's kernels get a graph time too; not ScatterMoE as shipped.
- ``hf_grouped_mm``: a peer written here in the style of Hugging Face transformers 5's ``grouped_mm`` experts
  (``transformers/integrations/moe.py``, ``grouped_mm_experts_forward``): sort by expert, ``torch._grouped_mm``
  with int32 offsets, the bias gathered per row and added in place, weighted, scattered back and summed over K.
- ``naive``: the per-expert mask loop of ``scripts/bench_moe.py`` (host syncs).

Before timing, every implementation's forward and gradients (x, weights, biases, routing weights) are checked
in bf16 against ``eager_experts`` in float32 at small shapes; one that fails is reported and left out. At each
shape, every implementation runs once on a Zipf routing before any is timed, so that autotuned kernels pick
their configs on routing like training's (``tune_like_training``), whatever ``--routing`` measures first.

Rows: the GPT-2 shape (E=8, F=3072, K in {1, 2}, T=8192) and the fine-grained shapes (E=64, F=768, K=8) and
(E=128, F=384, K=8) with T=16384; routing balanced and Zipf(1.0)-skewed. Reference: the dense MLP (D -> F -> D)
on K*T tokens (same active FLOPs). Per row: ``graph_ratio`` = CUDA-graph device time of forward+backward / the
dense one's (None when the implementation cannot be captured, e.g. a host sync: ``graph_error`` says why),
``wall_ratio`` = forward+backward time without graphs (CUDA events around eager launches) / dense's,
``peak_mem_ratio`` = peak activation memory of forward+backward / dense's, the absolute ms and MiB, and
``host_ms`` = host (CPU) time of one eager forward+backward (issue 20 item 2).

JSON (``--json PATH``; issue 20 item 7; read and written by ``scripts/peer_report.py``): one file with both parts,
``{"gpu", "date", "layer": [row, ...], "e2e": [row, ...]}``; a layer row has exactly ``LAYER_KEYS``, an e2e row
``E2E_KEYS`` (``compiled``: false or the torch.compile mode). ``e2e`` is empty unless ``--e2e [MODEL ...]`` asks for
``bench_moe.bench_e2e``'s training tokens/s (its model names, e.g. "moe top-1 triton"; none named: all of them),
measured in this process; ``--compile [MODE ...]`` also measures them compiled with each mode (none named:
``default``; ``--skip-uncompiled``: compiled only), in ``--e2e-rounds`` interleaved rounds (default 3). The file
is written once the layer rows are done and again after each compile mode's e2e rows (``--e2e-only``: each mode's
rows replace that mode's, the other modes' stay until theirs are measured);
``layer_date`` says when the layer rows were measured. While the layer rows are measured, the report as it would be
so far is written after each (shape, routing) group to ``PATH`` with ``.partial`` before its suffix (``h200.json``
-> ``h200.partial.json``), with ``layer_pending``: the groups of this run's ``--shapes`` and ``--routing`` still to
measure, each ``{"E", "F", "K", "T", "routing"}``. A run cut short leaves ``--json`` as it was and the partial
report beside it (there is no resume: run the layer part again; anything at that place but such a report, a link or
a file of yours, is refused before any work); one that finishes writes ``--json`` and removes the partial report (a
later run's replaces an earlier one's). ``--e2e-only`` measures only the e2e rows and keeps the layer rows (and
their ``layer_date``) of an existing ``--json`` file from the same GPU; ``--layer-only`` measures only the layer
rows and keeps its e2e rows: the two parts in separate processes when one would not fit a machine's time limit (each
part's ratios are against the dense model of its own process). A plain run replaces the whole report,
``--layer-only`` all its layer rows and ``--e2e-only`` all its rows of each mode it measures, so a run that would
drop a row it does not measure again (another shape, routing, implementation, model or mode, or an implementation
that fails its check) is refused before any measurement: move the report away to start anew. ``e2e_dates`` says
when each compile mode's e2e rows were measured (``date``: when the file was written).

    python scripts/bench_peers.py [--impls NAME ...] [--shapes gpt2 fine] [--routing balanced zipf]
        [--iters N] [--check-only] [--e2e [MODEL ...]] [--compile [MODE ...]] [--e2e-rounds N] [--skip-uncompiled]
        [--json PATH] [--e2e-only | --layer-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_moe import (
    ACT,
    D,
    Measured,
    add_compile_option,
    add_models_option,
    add_rounds_option,
    bench_e2e,
    check_json_path,
    compile_modes,
    dense_mlp,
    e2e_names,
    experts_inputs,
    graph_time,
    measure,
    naive_experts,
    parse_args,
    positive_int,
    routing,
    tune_like_training,
    user_error,
)  # scripts/ on path
from peer_impls import (  # scripts/ on path
    from_scattermoe,
    hf_grouped_mm_experts,
    load_scattermoe,
    scattermoe_experts,
    to_scattermoe,
)
from peer_report import (  # scripts/ on path
    EMPTY_REPORT,
    GROUP_KEYS,
    ROUTINGS,
    e2e_dates,
    e2e_row,
    keep_e2e,
    kept_notes,
    layer_row,
    mode_key,
    now,
    partial_path,
    read_report,
    refuse_dropped_e2e_rows,
    refuse_dropped_layer_rows,
    refuse_other_gpu,
    write_report,
)

from moe_emergence.console import ArgumentParser
from moe_emergence.experts import eager_experts, get_backend

IMPLS = ("triton", "grouped_mm", "scattermoe", "scattermoe_histc", "hf_grouped_mm", "naive")
SHAPES = {  # (E, F, K, T)
    "gpt2": [(8, 3072, 1, 8192), (8, 3072, 2, 8192)],
    "fine": [(64, 768, 8, 16384), (128, 384, 8, 16384)],
}


fail = user_error  # one ``error:`` line, exit 2


def load_impls(names: list[str]) -> dict:
    """name -> (fn, to_layout, from_layout): ``to_layout`` runs once outside the timed region."""
    same = lambda *p: p  # noqa: E731
    impls = {}
    for name in names:
        if name in ("triton", "grouped_mm"):
            impls[name] = (get_backend(name, torch.device("cuda")), same, same)
        elif name.startswith("scattermoe"):
            fn = scattermoe_experts(load_scattermoe(), histc=name == "scattermoe_histc")
            impls[name] = (fn, to_scattermoe, from_scattermoe)
        else:
            impls[name] = ({"hf_grouped_mm": hf_grouped_mm_experts, "naive": naive_experts}[name], same, same)
    return impls


# --- correctness and timing ------------------------------------------------------------------------------------


def rel_errors(fn, to_layout, from_layout, base, idx, gy) -> list[float]:
    """Relative errors of y and of the gradients (x, w1, b1, w2, b2, routing weights) of ``fn`` in the dtype of
    ``base`` against ``eager_experts`` in float32."""
    res = []
    for f, dt, to, back in (
        (eager_experts, torch.float32, None, None),
        (fn, base[0].dtype, to_layout, from_layout),
    ):
        leaves = [t.float().detach().requires_grad_() if dt == torch.float32 else t.detach().requires_grad_()
                  for t in base]  # fmt: skip
        x, p, wts = leaves[0], leaves[1:5], leaves[5]
        q = [t.detach().requires_grad_() for t in to(*p)] if to else p
        y = f(x, *q, idx, wts, ACT)
        g = torch.autograd.grad(y.float(), [x, *q, wts], gy)
        g = [g[0], *(back(*g[1:5]) if back else g[1:5]), g[5]]
        res.append([y.float()] + [t.float() for t in g])
    return [((b - a).norm() / a.norm()).item() for a, b in zip(*res, strict=True)]


def check_impls(impls: dict, tol: float = 2e-2) -> dict:
    """Impls whose bf16 forward and gradients are within ``tol`` (relative) of eager float32 at small shapes."""
    gen = torch.Generator().manual_seed(3)
    ok = dict(impls)
    T, Dm, Fm = 257, 128, 384
    for E, K in ((8, 1), (8, 2), (16, 8)):
        idx, wts = routing(T, E, K, "zipf", gen)
        base = [torch.randn(T, Dm), torch.randn(E, Dm, Fm) * 0.05, torch.randn(E, Fm) * 0.1]
        base += [torch.randn(E, Fm, Dm) * 0.05, torch.randn(E, Dm) * 0.1]
        base = [t.to("cuda", torch.bfloat16) for t in base] + [wts]
        gy = torch.randn(T, Dm).cuda()
        for name, (fn, to, back) in impls.items():
            if name not in ok:
                continue
            try:
                errs = rel_errors(fn, to, back, base, idx, gy)
            except Exception as e:  # noqa: BLE001 (any failure of a peer: reported, the impl left out)
                errs, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            names = ["y", "x", "w1", "b1", "w2", "b2", "weights"]
            report = (
                why if errs is None else ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs, strict=True))
            )
            good = errs is not None and max(errs) <= tol
            print(
                f"check {name:16s} E={E} K={K}: {'ok' if good else 'FAILED, left out'}: {report}", flush=True
            )
            if not good:
                del ok[name]
    return ok


def try_graph(step, iters: int) -> tuple[float | None, str | None]:
    """(graph ms, None), or (None, why) where ``step`` cannot be captured in a CUDA graph (a host sync...)."""
    try:
        return graph_time(step, iters), None
    except RuntimeError as e:
        if "captur" not in str(e).lower():  # only capture errors are expected; anything else is a bug
            raise
        torch.cuda.synchronize()
        return None, str(e).strip().splitlines()[0][:200]


NO_CAPTURE = {"naive": "not attempted: host syncs in every step (per-expert nonzero)"}


def run(fwd, leaves, iters: int, impl: str | None = None) -> dict:
    """Timings of ``fwd`` and its backward; inputs come from the CPU RNG (a failed capture can leave CUDA's
    generator unusable for the rest of the process)."""
    m: Measured = measure(fwd, leaves, iters)
    y = fwd().detach()  # no reference to the autograd graph may outlive this line (it breaks graph capture)
    gy = torch.randn(y.shape).to(y.device, y.dtype)
    del y
    if impl in NO_CAPTURE:  # a capture invalidated by a sync breaks the CUDA context for later rows
        g, why = None, NO_CAPTURE[impl]
    else:
        g, why = try_graph(lambda: torch.autograd.grad(fwd(), leaves, gy), iters)
    return dict(fwd_ms=m.fwd_ms, wall_ms=m.fwdbwd_ms, peak_mem_mib=m.peak_mem_mib, graph_ms=g, graph_error=why,
                host_ms=m.host_ms)  # fmt: skip


def bench(
    impls: dict, shapes: list[str], kinds: list[str], iters: int, done=None, device: str = "cuda"
) -> list[dict]:
    """The layer rows of every implementation at each shape of ``shapes`` and routing of ``kinds``; after each
    (shape, routing) group but the last ``done(rows, pending)`` where given: the rows so far and the groups still
    to measure (``pending_groups``), so that a run cut short keeps what it measured."""
    gen = torch.Generator().manual_seed(0)
    dt, rows = torch.bfloat16, []
    todo = pending_groups(shapes, kinds)
    for E, Fw, K, T in [s for name in shapes for s in SHAPES[name]]:
        xd = torch.randn(K * T, D).to(device, dt).requires_grad_()
        wd = [
            torch.randn(D, Fw) * 0.02,
            torch.randn(Fw) * 0.1,
            torch.randn(Fw, D) * 0.02,
            torch.randn(D) * 0.1,
        ]
        wd = [t.to(device, dt).requires_grad_() for t in wd]
        dense = run(lambda xd=xd, wd=wd: dense_mlp(xd, *wd), [xd, *wd], iters)
        print(f"dense E={E} F={Fw} K={K} T={T} (on K*T tokens): wall {dense['wall_ms']:.3f} ms graph "
              f"{dense['graph_ms']:.3f} ms mem {dense['peak_mem_mib']:.0f} MiB", flush=True)  # fmt: skip
        del xd, wd
        tune_like_training(impls, E, Fw, *routing(T, E, K, "zipf", torch.Generator().manual_seed(1)), device)
        for kind in kinds:
            idx, wts = routing(T, E, K, kind, gen)
            x, p = experts_inputs(T, E, Fw, device)
            wts.requires_grad_()
            for name, (fn, to_layout, _) in impls.items():
                q = [t.detach().requires_grad_() for t in to_layout(*p)]  # once, outside the timed region

                def fwd(fn=fn, x=x, q=q, idx=idx, wts=wts):
                    return fn(x, *q, idx, wts, ACT)

                r = layer_row(name, E, Fw, K, T, kind, run(fwd, [x, *q, wts], iters, name), dense)
                rows.append(r)
                g = "n/a" if r["graph_ms"] is None else f"{r['graph_ms']:7.3f} ms ({r['graph_ratio']:5.2f}x)"
                print(f"E={E:3d} F={Fw:4d} K={K} T={T} {kind:8s} {name:16s} graph {g} wall {r['wall_ms']:7.3f} "
                      f"ms ({r['wall_ratio']:5.2f}x) mem {r['peak_mem_mib']:6.0f} MiB ({r['peak_mem_ratio']:.2f}x)"
                      + (f"  [no graph: {r['graph_error']}]" if r["graph_error"] else ""), flush=True)  # fmt: skip
                del q
            torch.cuda.empty_cache()
            todo.pop(0)
            if done is not None and todo:
                done(list(rows), list(todo))
    return rows


def pending_groups(shapes: list[str], kinds: list[str]) -> list[dict]:
    """The (shape, routing) groups of a run in the order ``bench`` measures them, as ``layer_pending`` lists them:
    ``{"E", "F", "K", "T", "routing"}``."""
    groups = [(E, Fw, K, T, k) for n in shapes for E, Fw, K, T in SHAPES[n] for k in kinds]
    return [dict(zip(GROUP_KEYS, g, strict=True)) for g in groups]


LAYER_DEFAULTS = dict(impls=list(IMPLS), shapes=list(SHAPES), routing=list(ROUTINGS), iters=30)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    # the layer options default to None here (LAYER_DEFAULTS filled in after the checks): an option typed out
    # with its default value is still an option given, refused where it would be ignored
    ap.add_argument("--impls", nargs="+", choices=IMPLS, help=f"default: {' '.join(LAYER_DEFAULTS['impls'])}")
    ap.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), help="default: all")
    ap.add_argument("--routing", nargs="+", choices=ROUTINGS, help="default: all")
    ap.add_argument("--iters", type=positive_int, help=f"default: {LAYER_DEFAULTS['iters']}")
    ap.add_argument("--check-only", action="store_true", help="only the correctness check")
    add_models_option(ap, "--e2e", "*", "also bench_moe's e2e tokens/s")
    add_compile_option(ap, "e2e compiled too, with each MODE (bare: default)")
    add_rounds_option(ap)
    ap.add_argument(
        "--skip-uncompiled",
        action="store_true",
        help="with --compile: the compiled e2e rows only (--e2e-only: the report's uncompiled rows stay)",
    )
    ap.add_argument("--json", default=None, help="write {gpu, date, layer, e2e} to this JSON file")
    ap.add_argument(
        "--e2e-only",
        action="store_true",
        help="only the e2e rows; an existing --json file's layer rows (same GPU) are kept, with their date",
    )
    ap.add_argument(
        "--layer-only",
        action="store_true",
        help="only the layer rows; an existing --json file's e2e rows (same GPU) are kept, with their date",
    )
    args = parse_args(ap, argv)
    given_layer = given_options(args, *(f"--{k}" for k in LAYER_DEFAULTS))
    for name, default in LAYER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("impls", "shapes", "routing"):  # each once, in the order given
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    # --check-only: the check alone, on its own shapes (it takes --impls only); nothing measured, nothing written
    if args.check_only:
        given = given_options(
            args,
            "--e2e",
            "--compile",
            "--e2e-rounds",
            "--skip-uncompiled",
            "--json",
            "--e2e-only",
            "--layer-only",
        )
        given += [o for o in given_layer if o != "--impls"]
        if given:
            fail(f"--check-only runs the check against eager alone: drop {' '.join(given)}")
    old = None
    if args.json is not None:
        check_json_path(args.json)
        # an existing file must be a report: it is replaced (or, --e2e-only and --layer-only, extended)
        old = read_report(Path(args.json))
        if not args.e2e_only:
            check_partial_path(args.json)
    if args.layer_only:
        given = given_options(args, "--e2e", "--compile", "--e2e-rounds", "--e2e-only", "--skip-uncompiled")
        if given:
            fail(f"--layer-only measures no e2e rows and writes a report: drop {' '.join(given)}")
        if args.json is None:
            fail("--layer-only needs --json PATH (the report whose e2e rows it keeps)")
    if args.compile is not None and args.e2e is None:
        fail("--compile measures the e2e rows compiled: give --e2e [MODEL ...] too")
    if args.e2e_rounds is not None and args.e2e is None:
        fail("--e2e-rounds sets the e2e rows' rounds: give --e2e [MODEL ...] too")
    if args.skip_uncompiled and args.compile is None:
        fail("--skip-uncompiled leaves the compiled e2e rows only: give --compile [MODE ...] too")
    graphed = [m for m in dict.fromkeys(args.e2e or []) if m.endswith("graphed")]
    if args.skip_uncompiled and graphed:
        fail(f"--skip-uncompiled: {', '.join(graphed)} run uncompiled only (their own CUDA graphs), so would get no"
             " row; drop them or --skip-uncompiled")  # fmt: skip
    if args.e2e_only:
        if args.e2e is None or args.json is None:
            fail("--e2e-only needs --e2e [MODEL ...] and --json PATH")
        if given_layer:
            fail(f"--e2e-only measures no layer rows: drop {' '.join(given_layer)}")
    refuse_dropped_rows(args, old)
    return args


def given_options(args: argparse.Namespace, *options: str) -> list[str]:
    """Those of ``options`` (as typed: ``--e2e``) that the command line gave: a value other than None or False
    (a bare ``--e2e`` or ``--compile`` is an empty list: given)."""
    return [o for o in options if getattr(args, o[2:].replace("-", "_")) not in (None, False)]


def replaces(args: argparse.Namespace) -> str:
    """What a run writing ``--json`` replaces of a report already there, in words."""
    if args.layer_only:
        return "--layer-only replaces its layer rows"
    if args.e2e_only:
        return "--e2e-only replaces the e2e rows of each mode it measures"
    return "a run without --layer-only or --e2e-only replaces the whole report"


def refuse_dropped_rows(args: argparse.Namespace, old: dict | None) -> None:
    """Before any work: a run may not drop a row of the report ``old`` at ``--json`` (None: none there) that it
    does not measure again (``replaces``: which rows it replaces); one ``error:`` line."""
    if old is None:
        return
    if not args.e2e_only:
        groups = pending_groups(args.shapes, args.routing)
        refuse_dropped_layer_rows(args.json, old, groups, args.impls, replaces(args))
    if not args.layer_only:
        modes = None if args.e2e is None else measured_modes(args)
        refuse_dropped_e2e_rows(args.json, old, modes, args.e2e or e2e_names(), args.e2e_only, replaces(args))


def refuse_failed_impls(args: argparse.Namespace, passed: list[str]) -> None:
    """After the check against eager, before any measurement: the report at ``--json`` may not lose the layer
    rows of an implementation that failed it (a run replacing its layer rows would drop them); one error line."""
    old = read_report(Path(args.json)) if args.json is not None and not args.e2e_only else None
    failed = [i for i in args.impls if i not in passed]
    lost = sorted({r["impl"] for r in (old or EMPTY_REPORT)["layer"] if r["impl"] in failed})
    if lost:
        fail(
            f"--json {args.json}: {', '.join(lost)} failed the check against eager (lines above), and the report's"
            " rows of it would be dropped: nothing measured; fix it, or give another --json"
        )


def measured_modes(args: argparse.Namespace) -> list[str | bool]:
    """The e2e rows' ``compiled`` values this run measures: False (uncompiled, unless ``--skip-uncompiled``),
    then each ``--compile`` mode."""
    return ([] if args.skip_uncompiled else [False]) + compile_modes(args.compile)


def check_partial_path(path: str) -> None:
    """Before any work: the layer part's partial report beside ``path`` (``partial_path``) can be written, and
    what is there is a report (of an earlier cut run), not a link or a file of the user's: it will be replaced
    and, once the run finishes, removed."""
    partial = partial_path(path)
    if partial.is_symlink():
        fail(f"--json {path}: its partial report {partial} is a link; remove it or choose another --json")
    check_json_path(str(partial))
    # anything but a report there: one error line
    read_report(partial, f"--json {path}: its partial report {partial}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.e2e_only:
        e2e_only(args)
        return
    if any(n.startswith("scattermoe") for n in args.impls):
        load_scattermoe()  # fails early, before any GPU work, where the package is missing
    if not torch.cuda.is_available():
        fail("bench_peers.py needs a CUDA device (none visible to torch)")
    gpu = torch.cuda.get_device_name()
    print(f"device: {gpu}, torch {torch.__version__}", flush=True)
    if args.layer_only:
        extended = read_report(Path(args.json)) or EMPTY_REPORT
        refuse_other_gpu(args.json, extended, extended["e2e"], gpu)
    impls = check_impls(load_impls(args.impls))
    if args.check_only:
        return
    if not impls:
        fail(
            "no implementation passed its check against eager (lines above): nothing measured, nothing written"
        )
    refuse_failed_impls(args, list(impls))

    partial = None if args.json is None else partial_path(args.json)

    def done(rows: list[dict], pending: list[dict], date: str | None = None) -> None:
        """The report so far: into ``partial`` while groups are pending, into ``--json`` once all are done."""
        path = str(partial) if pending and partial is not None else args.json
        if args.layer_only:
            keep_e2e(path, extended, gpu, rows, date or now(), pending)
        else:
            write_report(path, gpu, rows, [], date or now(), pending=pending)

    layer = bench(impls, args.shapes, args.routing, args.iters, done)
    layer_date = now()
    done(layer, [], layer_date)
    if partial is not None:
        partial.unlink(missing_ok=True)  # the rows it held are in --json now
    if args.layer_only:
        return
    if args.e2e is not None:
        dates = ModeDates()

        def e2e_done(rows: list[dict]) -> None:  # after each compile mode: a run cut short keeps those done
            e2e = [e2e_row(r) for r in rows]
            write_report(args.json, gpu, layer, e2e, layer_date, kept_dates=dates.of(e2e))

        modes, uncompiled = compile_modes(args.compile), not args.skip_uncompiled
        e2e_done(bench_e2e(modes, args.e2e or None, done=e2e_done, uncompiled=uncompiled, **e2e_rounds(args)))


def e2e_only(args) -> None:
    """``--e2e-only``: measure the e2e rows and write them into ``args.json``: its layer rows (same GPU), its other
    top-level keys and its e2e rows of compile modes not measured again are kept, with their ``e2e_dates``
    (uncompiled too unless ``--skip-uncompiled``; the rows of a mode measured again are all replaced: their ratios
    are to that process's dense model)."""
    if not torch.cuda.is_available():
        fail("bench_peers.py needs a CUDA device (none visible to torch)")
    gpu = torch.cuda.get_device_name()
    modes = compile_modes(args.compile)
    old = read_report(Path(args.json)) or EMPTY_REPORT
    # the rows of the modes not measured again are kept (the rows of a mode measured again are all replaced:
    # each mode's ratios are against its own process's dense model)
    kept = [r for r in old["e2e"] if r["compiled"] not in measured_modes(args)]
    refuse_other_gpu(args.json, old, old["layer"] + kept, gpu)
    layer_date = old.get("layer_date", old.get("date")) if old["layer"] else None
    same_gpu, dates = old.get("gpu") == gpu, ModeDates()

    def done(rows: list[dict]) -> None:
        """After each compile mode: its rows replace the report's rows of that mode (the other modes' stay, with
        their dates, until theirs are measured; another GPU's go at once)."""
        new = [e2e_row(r) for r in rows]
        measured = {r["compiled"] for r in new}
        old_rows = [r for r in old["e2e"] if same_gpu and r["compiled"] not in measured]
        write_report(
            args.json, gpu, old["layer"], old_rows + new, layer_date, kept_notes(old),
            e2e_dates(old | {"e2e": old_rows}) | dates.of(new), old.get("layer_pending"),
        )  # fmt: skip

    done(
        bench_e2e(modes, args.e2e or None, done=done, uncompiled=not args.skip_uncompiled, **e2e_rounds(args))
    )


def e2e_rounds(args) -> dict:
    """``bench_e2e``'s ``rounds`` where ``--e2e-rounds`` gave it (else its default)."""
    return {} if args.e2e_rounds is None else {"rounds": args.e2e_rounds}


class ModeDates:
    """When this run measured each compile mode's e2e rows: the time of the first write that held them."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def of(self, rows: list[dict]) -> dict[str, str]:
        for mode in map(mode_key, rows):
            if mode not in self.first:
                self.first[mode] = now()
        return dict(self.first)


if __name__ == "__main__":
    main()
