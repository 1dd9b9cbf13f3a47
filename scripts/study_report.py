#!/usr/bin/env python
"""Tables and figures of docs/results.md from the study's outputs (issue 10).

    python scripts/study_report.py --runs RUNS --reports REPORTS [--walls driver.log ...] --out docs

RUNS holds ``<run>/metrics.jsonl`` of every run, REPORTS ``<run>/metrics.json`` of analyze.py on each run
(scripts/study_gpu.sh packs both). Run names are ``study-<config>-s<seed>[-ddp]``. Writes:
  docs/study/tables.md               the markdown tables quoted in docs/results.md
  docs/study/metrics/<run>.json      analyze.py's metrics.json of each run (raw, every number traceable)
  docs/study/trajectories/<run>.json the val and eval records and every 50th train record, selected keys
  docs/figures/study_*.png           small figures
Per-domain test losses are analyze.py's (``loss`` of each report: token-weighted, float32, on the eval (test)
blocks it read, which must be the same blocks in every report: one ``eval_set`` fingerprint). The trainer's own
final evaluation (``eval/`` keys, ``eval.final_split: eval``) reads ``eval.max_blocks`` of them (400 of 655 in
the 2026-12-01 study), so it is shown only as a check beside the paired differences. The CI over seeds is
Student-t, with an exact sign-flip test for paired differences (moe_emergence.analysis.seeds); routing
numbers come from analyze.py (CIs over documents by bootstrap; null baselines and the step-0 router, where
the reports have them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from moe_emergence.analysis import figures
from moe_emergence.analysis.seeds import mean_ci, paired_test, sign_flip_test
from moe_emergence.console import ArgumentParser
from moe_emergence.errors import ConfigError, run_cli
from moe_emergence.telemetry import names as keys

NAME = re.compile(r"^study-(?P<config>.+)-s(?P<seed>0|[1-9]\d*)(?P<ddp>-ddp)?$")
NAME_ANY_SEED = re.compile(r"^study-.+-s\d+(-ddp)?$")  # also a seed with leading zeros (refused)
ORDER = [
    "dense",
    "moe-top1",
    "moe-top2",
    "no-balance",
    "no-lb",
    "no-noise",
    "drop-init",
    "moe-top1 (ddp)",
    "micro (ddp)",
]
DOMAINS = ["code", "math", "prose"]
# the metrics keys a trajectory keeps (``kept``): these, every domain's val and eval loss, the per-layer
# statistics KEEP_LAYER_STATS of train, val and eval routing, and train routing's expert shares
KEEP_KEYS = {
    "step",
    keys.VAL_LM_LOSS,
    keys.EVAL_LM_LOSS,
    keys.NOISE_STD,
    keys.TRAIN_LM_LOSS,
    keys.TRAIN_LB_LOSS,
    keys.TRAIN_Z_LOSS,
    keys.TOKENS_PER_SEC,
}
KEEP_LAYER_STATS = ("entropy", "max_frac", "domain_nmi")


def load(runs: Path, reports: Path) -> dict:
    """Every ``study-<config>-s<seed>[-ddp]`` folder of ``runs`` with its records and report; ``ConfigError``
    for a study folder without metrics.jsonl, an arm not in ``ORDER`` or two folders of one arm and seed."""
    out, seen = {}, {}
    for d in sorted(runs.iterdir()):
        mt = NAME.match(d.name)
        if not mt and NAME_ANY_SEED.match(d.name):
            raise ConfigError(f"--runs: {str(d)!r}: its seed has a leading zero (study.sh names runs "
                              "study-<config>-s<seed>, the seed without leading zeros)")  # fmt: skip
        if not mt or not d.is_dir():
            continue
        config = mt["config"] + (" (ddp)" if mt["ddp"] else "")
        if config not in ORDER:
            raise ConfigError(f"--runs: {str(d)!r} is a run of arm {config!r}, not one of {', '.join(ORDER)}")
        if (config, int(mt["seed"])) in seen:
            raise ConfigError(f"--runs: {seen[config, int(mt['seed'])]!r} and {str(d)!r} are both seed "
                              f"{mt['seed']} of {config}")  # fmt: skip
        seen[config, int(mt["seed"])] = str(d)
        if not (d / "metrics.jsonl").is_file():
            raise ConfigError(f"--runs: {str(d)!r} has no metrics.jsonl (a study run folder needs one)")
        recs = _read_jsonl(d / "metrics.jsonl")
        rep = reports / d.name / "metrics.json"
        section, eval_set = _read_report(rep, d.name) if rep.is_file() else (None, None)
        out[d.name] = {
            "config": config,
            "seed": int(mt["seed"]),
            "records": recs,
            "analysis": section,
            "eval_set": eval_set,
            "report_path": rep if rep.is_file() else None,
        }
    return out


# what the tables and figures read from every MoE layer of an analyze.py report
REPORT_LAYER_KEYS = (
    "domain_nmi",
    "token_type_nmi",
    "token_type_fractions",
    "domain_expert_fractions",
    "max_frac",
)


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl; ``ConfigError`` naming the file and line of a broken one."""
    recs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}, line {i}: not a JSON record ({e.msg}); a run cut off mid-write?"
            ) from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}, line {i}: a record is a JSON object, got {type(rec).__name__}")
        bad = [k for k, v in rec.items() if k.startswith((keys.VAL + "/", keys.EVAL + "/"))
               and k != keys.blocks_fingerprint(k.split("/")[0]) and not _finite(v)]  # fmt: skip
        if bad or not isinstance(rec.get("step"), int):
            what = f"{bad[0]} is {rec[bad[0]]!r}" if bad else f"step is {rec.get('step')!r}"
            raise ConfigError(f"{path}, line {i}: {what}, not a finite number (an integer step)")
        recs.append(rec)
    return recs


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _read_text(path: Path) -> str:
    """A file's text; ``ConfigError`` naming it when it is not a readable UTF-8 file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a UTF-8 text file ({type(e).__name__})") from None


def _read_report(path: Path, run: str) -> tuple[dict, dict]:
    """The run's section of an analyze.py metrics.json and the report's ``eval_set`` (fingerprint, blocks);
    ``ConfigError`` when it is broken, of another run, or has no per-domain loss."""
    try:
        report = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    runs = report.get("runs") if isinstance(report, dict) else None
    if not isinstance(runs, dict):
        raise ConfigError(f"{path}: not an analyze.py metrics.json (no 'runs' object)")
    section = runs.get(run)
    if not isinstance(section, dict) or not isinstance(section.get("layers", {}), dict):
        raise ConfigError(f"{path}: holds no analysis of run {run!r} (a report of another run?)")
    eval_set = report.get("eval_set")
    if (not isinstance(eval_set, dict) or not {"fingerprint", "blocks"} <= eval_set.keys()
            or not isinstance(eval_set["fingerprint"], str)):  # fmt: skip
        raise ConfigError(f"{path}: no eval_set with fingerprint and blocks (analyze.py of this version?)")
    loss = section.get("loss")
    bad = [d for d in [*DOMAINS, "all"]
           if not isinstance((loss or {}).get(d), dict) or not _finite(loss[d].get("value"))]  # fmt: skip
    if bad:
        raise ConfigError(f"{path}: {run!r} has no finite loss of {bad[0]!r} (its per-domain test loss)")
    for L, layer in section.get("layers", {}).items():
        missing = [k for k in REPORT_LAYER_KEYS if not isinstance(layer, dict) or k not in layer]
        if missing:
            raise ConfigError(
                f"{path}: layer {L} of {run!r} has no {', '.join(missing)} (analyze.py of this version?)"
            )
        if not str(L).isdigit():
            raise ConfigError(f'{path}: layer key {L!r} of {run!r} is not a block number (e.g. "3")')
        for k in ("domain_nmi", "token_type_nmi"):
            if not isinstance(layer[k], dict) or not _finite(layer[k].get("value")):
                raise ConfigError(f"{path}: layer {L} of {run!r}: {k} has no finite value")
        values = {"max_frac": layer["max_frac"]}
        values.update({h: get(layer) for h, get in BASELINE_COLUMNS})
        values.update({k: _value(layer.get(k)) for _, k in NORMALISATIONS})
        bad = [k for k, v in values.items() if v is not None and not _finite(v)]
        if bad:
            raise ConfigError(
                f"{path}: layer {L} of {run!r}: {bad[0]} is {values[bad[0]]!r}, not a finite number"
            )
    return section, eval_set


def eval_records(recs: list[dict]) -> list[dict]:
    """The records of the trainer's evaluations on the eval (test) split."""
    return [r for r in recs if keys.domain_loss("code") in r]


def final_eval(recs: list[dict]) -> dict:
    ev = eval_records(recs)
    if not ev:
        raise ValueError("no eval record (the test split is evaluated with eval.final_split: eval)")
    return max(ev, key=lambda r: r["step"])


def test_loss(run: dict) -> dict[str, float]:
    """analyze.py's token-weighted test loss of a run per domain and ``all`` (nats/token)."""
    return {d: float(run["analysis"]["loss"][d]["value"]) for d in [*DOMAINS, "all"]}


def fmt(ci: dict, f: str = ".3f") -> str:
    """``value [ci_low, ci_high]`` of a ``mean_ci`` dict (the value alone for one seed), then ``p=...`` when
    the dict has a sign-flip ``p_value``."""
    if ci["n"] == 1 or np.isnan(ci["ci_low"]):
        out = f"{ci['value']:{f}}"
    else:
        out = f"{ci['value']:{f}} [{ci['ci_low']:{f}}, {ci['ci_high']:{f}}]"
    return out + (f" p={ci['p_value']:.2g}" if "p_value" in ci else "")


def one_sample_test(values) -> dict:
    """``mean_ci`` of per-seed values with the sign-flip p-value of mean = 0 (e.g. per-seed changes)."""
    values = list(values)
    return {**mean_ci(values), "p_value": sign_flip_test(values)["p_value"]}


def by_config(runs: dict) -> dict[str, dict[int, str]]:
    g = defaultdict(dict)
    for name, r in runs.items():
        g[r["config"]][r["seed"]] = name
    return {c: g[c] for c in ORDER if c in g}


def loss_table(runs: dict, groups: dict) -> str:
    rows = [
        "| run | seeds | code | math | prose | all | ppl code / math / prose |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, seeds in groups.items():
        ev = [test_loss(runs[n]) for n in seeds.values()]
        cis = {d: mean_ci(e[d] for e in ev) for d in [*DOMAINS, "all"]}
        ppl = " / ".join(f"{np.exp(cis[d]['value']):.1f}" for d in DOMAINS)
        rows.append(
            f"| {c} | {len(ev)} | " + " | ".join(fmt(cis[d]) for d in [*DOMAINS, "all"]) + f" | {ppl} |"
        )
    return "\n".join(rows)


def paired_table(runs: dict, groups: dict) -> str:
    rows = [
        "| run minus dense control (same seed; p: exact sign-flip test) | seeds | code | math | prose | all "
        "| all, trainer's final eval (its blocks) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = groups.get("dense", {})
    for c, seeds in groups.items():
        if c == "dense" or c.endswith("(ddp)"):
            continue
        cells = []
        for d in [*DOMAINS, "all"]:
            a = {s: test_loss(runs[n])[d] for s, n in seeds.items()}
            b = {s: test_loss(runs[n])[d] for s, n in base.items()}
            cells.append(paired_test(a, b))
        a = {s: final_eval(runs[n]["records"])[keys.EVAL_LM_LOSS] for s, n in seeds.items()}
        b = {s: final_eval(runs[n]["records"])[keys.EVAL_LM_LOSS] for s, n in base.items()}
        cells.append(paired_test(a, b))
        rows.append(f"| {c} | {cells[0]['n']} | " + " | ".join(fmt(x, "+.4f") for x in cells) + " |")
    return "\n".join(rows)


def nmi_table(runs: dict, groups: dict) -> str:
    layers = None
    rows = []
    for c, seeds in groups.items():
        for s, n in seeds.items():
            a = runs[n]["analysis"]
            if not a or not a.get("layers"):
                continue
            layers = layers or sorted(a["layers"], key=int)
            cells = []
            for L in layers:
                lm = a["layers"][L]
                ci = lm["domain_nmi"]
                ci_text = (f" [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
                           if _finite(ci.get("ci_low")) and _finite(ci.get("ci_high")) else "")  # fmt: skip
                cells.append(f"{ci['value']:.3f}{ci_text}")
            maxf = " / ".join(f"{a['layers'][L]['max_frac']:.2f}" for L in layers)
            tt = " / ".join(f"{a['layers'][L]['token_type_nmi']['value']:.3f}" for L in layers)
            rows.append(f"| {c} | {s} | " + " | ".join(cells) + f" | {maxf} | {tt} |")
    head = (
        "| run | seed | "
        + " | ".join(f"NMI layer {L}" for L in layers)
        + " | max share per layer | code token-type NMI per layer |"
    )
    return "\n".join([head, "|" + "---|" * (len(layers) + 4), *rows])


def nmi_seed_table(runs: dict, groups: dict) -> str:
    rows = ["| run | seeds | NMI per layer, mean [95% CI over seeds] |", "|---|---|---|"]
    for c, seeds in groups.items():
        an = [runs[n]["analysis"] for n in seeds.values() if (runs[n]["analysis"] or {}).get("layers")]
        if len(an) < 2:
            continue
        layers = sorted(an[0]["layers"], key=int)
        cells = [f"L{L}: " + fmt(mean_ci(a["layers"][L]["domain_nmi"]["value"] for a in an)) for L in layers]
        rows.append(f"| {c} | {len(an)} | " + "; ".join(cells) + " |")
    return "\n".join(rows)


BASELINE_COLUMNS = (  # (header, per-layer value of one run's metrics.json or None when the report lacks it)
    ("NMI", lambda lm: lm["domain_nmi"]["value"]),
    ("NMI all top-k", lambda lm: lm.get("domain_nmi_topk", {}).get("value")),
    ("change from step 0", lambda lm: (lm.get("step0") or {}).get("change_domain_nmi", {}).get("value")),
    ("change all top-k", lambda lm: (lm.get("step0") or {}).get("change_domain_nmi_topk", {}).get("value")),
    ("shuffled-domain p95", lambda lm: lm.get("null_permutation", {}).get("domain_nmi", {}).get("p95")),
    ("token-id router NMI", lambda lm: lm.get("token_identity_nmi", {}).get("value")),
    ("CMI excess over null (nats)", lambda lm: lm.get("domain_cmi_given_token", {}).get("excess_over_null")),
)
TESTED = {"change from step 0", "change all top-k", "CMI excess over null (nats)"}  # sign-flip p vs 0


def baseline_seed_table(runs: dict, groups: dict) -> str:
    """Per config and layer, mean [95% CI over seeds] of the domain NMI and its baselines (analyze.py keys,
    docs/analysis.md); changes and the CMI excess also get the sign-flip p of mean = 0. Reports without a
    value (older analyze.py, unknown step 0) give n/a."""
    head = "| run | seeds | layer | " + " | ".join(h for h, _ in BASELINE_COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(BASELINE_COLUMNS) + 3)]
    for c, seeds in groups.items():
        an = [runs[n]["analysis"] for n in seeds.values() if (runs[n]["analysis"] or {}).get("layers")]
        if not an:
            continue
        for L in sorted(an[0]["layers"], key=int):
            cells = []
            for header, get in BASELINE_COLUMNS:
                vals = [get(a["layers"][L]) for a in an]
                if any(v is None for v in vals):
                    cells.append("n/a")
                else:
                    cells.append(fmt(one_sample_test(vals) if header in TESTED else mean_ci(vals)))
            rows.append(f"| {c} | {len(an)} | {L} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


NORMALISATIONS = (  # (header, analyze.py layer key): I(domain; expert) and its three normalisations
    ("MI (nats)", "domain_mi_nats"),
    ("I/H(D)", "domain_nmi"),
    ("I/sqrt(H(D) H(E))", "domain_nmi_sqrt"),
    ("2I/(H(D)+H(E))", "domain_nmi_arith"),
)


def _value(x):
    return x["value"] if isinstance(x, dict) else x


def normalisation_table(runs: dict, groups: dict) -> str:
    """Per config and layer, the mean over seeds of the domain-expert MI and each normalisation of it
    (docs/analysis.md); n/a where a report lacks a key."""
    rows = ["| run | seeds | layer | " + " | ".join(h for h, _ in NORMALISATIONS) + " |",
            "|" + "---|" * (len(NORMALISATIONS) + 3)]  # fmt: skip
    for c, seeds in groups.items():
        an = [runs[n]["analysis"] for n in seeds.values() if (runs[n]["analysis"] or {}).get("layers")]
        for L in sorted(an[0]["layers"], key=int) if an else []:
            vals = [[a["layers"][L].get(k) for a in an] for _, k in NORMALISATIONS]
            cells = ["n/a" if None in v else f"{np.mean([_value(x) for x in v]):.3f}" for v in vals]
            rows.append(f"| {c} | {len(an)} | {L} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def speed_table(runs: dict, groups: dict, walls: dict[str, float]) -> str:
    rows = ["| run | seed | tokens/s (median of logged steps) | wall s |", "|---|---|---|---|"]
    for c, seeds in groups.items():
        for s, n in seeds.items():
            tps = [
                r[keys.TOKENS_PER_SEC]
                for r in runs[n]["records"]
                if keys.TOKENS_PER_SEC in r and r["step"] > 50
            ]
            rows.append(f"| {c} | {s} | {np.median(tps):,.0f} | {walls.get(n, float('nan')):.0f} |")
    return "\n".join(rows)


def series(recs: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in recs if key in r]
    return (
        (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.zeros(0), np.zeros(0))
    )


def fig_loss(runs: dict, groups: dict, path: Path) -> None:
    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    w = 0.8 / len(groups)
    for i, (c, seeds) in enumerate(groups.items()):
        ev = [test_loss(runs[n]) for n in seeds.values()]
        cis = [mean_ci(e[d] for e in ev) for d in DOMAINS]
        xs = np.arange(len(DOMAINS)) + (i - (len(groups) - 1) / 2) * w
        err = [[0 if np.isnan(x["ci_low"]) else x["value"] - x["ci_low"] for x in cis],
               [0 if np.isnan(x["ci_high"]) else x["ci_high"] - x["value"] for x in cis]]  # fmt: skip
        ax.bar(xs, [x["value"] for x in cis], w, yerr=err, capsize=2, label=f"{c} (n={len(ev)})")
    ax.set_xticks(range(len(DOMAINS)), DOMAINS)
    ax.set_ylim(3.0, 4.6)
    ax.set_ylabel("test loss (nats/token)")
    ax.set_title("final test loss per domain (mean, 95% CI over seeds where n > 1)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    figures._save(fig, path)


def fig_nmi(runs: dict, groups: dict, path: Path) -> None:
    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    moe = {c: s for c, s in groups.items() if c != "dense"}
    w = 0.8 / max(len(moe), 1)
    for i, (c, seeds) in enumerate(moe.items()):
        for j, n in enumerate(seeds.values()):
            a = runs[n]["analysis"]
            layers = sorted(a["layers"], key=int)
            xs = np.arange(len(layers)) + (i - (len(moe) - 1) / 2) * w + (j - 1) * w / 5
            cis = [a["layers"][L]["domain_nmi"] for L in layers]
            lo = [x["value"] - x["ci_low"] if _finite(x.get("ci_low")) else 0.0 for x in cis]  # null: no CI
            hi = [x["ci_high"] - x["value"] if _finite(x.get("ci_high")) else 0.0 for x in cis]
            ax.errorbar(xs, [x["value"] for x in cis], fmt="o", ms=3, color=f"C{i}", capsize=2, yerr=[lo, hi],
                        label=c if j == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(layers)), [f"layer {L}" for L in layers])
    ax.set_ylabel("NMI(domain; top-1 expert)")
    ax.set_title(
        "domain-expert NMI per layer, one point per seed (95% bootstrap CI over documents)", fontsize=9
    )
    ax.legend(fontsize=6, ncol=3)
    figures._save(fig, path)


def fig_trajectories(runs: dict, groups: dict, path: Path, configs=("moe-top1", "no-balance")) -> None:
    """Rows: per-token router entropy, largest expert share, domain NMI (train routing); columns: configs."""
    plt = figures._plt()
    panels = [
        ("entropy", "router entropy (nats)"),
        ("max_frac", "largest expert share"),
        ("domain_nmi", "domain NMI"),
    ]
    fig, axes = plt.subplots(
        len(panels), len(configs), figsize=(3.4 * len(configs), 5.6), sharex=True, sharey="row"
    )
    for j, c in enumerate(configs):
        for s, n in groups.get(c, {}).items():
            recs = runs[n]["records"]
            for i, (k, label) in enumerate(panels):
                for li, L in enumerate(figures.router_layers(recs)):
                    x, y = series(recs, keys.layer_key(keys.ROUTER, L, k))
                    axes[i, j].plot(x, y, color=f"C{li}", lw=0.9, alpha=0.5 + 0.25 * (s == 0),
                                    label=f"layer {L}" if s == 0 else None)  # fmt: skip
                axes[i, 0].set_ylabel(label, fontsize=8)
        axes[0, j].set_title(f"{c} (lines: 3 layers x seeds)", fontsize=9)
        axes[0, j].axhline(np.log(8), color="gray", ls=":", lw=1)
        axes[1, j].axhline(1 / 8, color="gray", ls=":", lw=1)
        axes[-1, j].set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=6)
    figures._save(fig, path)


def kept(key: str) -> bool:
    """Whether a trajectory keeps the metrics key ``key`` (``KEEP_KEYS``, ``KEEP_LAYER_STATS``)."""
    loss_prefixes = [p for p, _ in keys.SPLIT_PREFIXES.values()]
    if key in KEEP_KEYS or any(keys.parse_domain_loss(key, p) is not None for p in loss_prefixes):
        return True
    layer = keys.parse_layer_key(key)
    if layer is None:
        return False
    prefix, _, name = layer
    if prefix == keys.ROUTER and keys.parse_expert_frac(name) is not None:
        return True
    return prefix in (keys.ROUTER, keys.VAL_ROUTER, keys.EVAL_ROUTER) and name in KEEP_LAYER_STATS


def trajectory(recs: list[dict]) -> list[dict]:
    keep = [
        r for r in recs if any(k.startswith((keys.VAL, keys.EVAL)) for k in r) or r.get("step", 0) % 50 == 0
    ]
    return [{k: float(f"{v:.5g}") if _finite(v) else None for k, v in r.items() if kept(k)} for r in keep]


REQUIRED_ARMS = ("dense", "moe-top1", "no-balance")  # every table compares with these; the figures show them


def _two_that_differ(value_of: dict[str, object]) -> tuple[str, str] | None:
    """Two names whose values differ (the first of each of the first two distinct values), or None."""
    first: dict[object, str] = {}
    for name, v in value_of.items():
        first.setdefault(v, name)
    return tuple(list(first.values())[:2]) if len(first) > 1 else None


def check_complete(runs: dict, groups: dict, runs_dir: Path, reports: Path) -> None:
    """Raises ``ConfigError`` (before anything is written) when a run has no analyze.py report or an arm
    the tables compare with has no runs: a half-analysed study would give tables that mix run sets."""
    if not runs:
        raise ConfigError(f"--runs {str(runs_dir)!r}: no study-<config>-s<seed> folder with metrics.jsonl")
    missing = [n for n, r in runs.items() if r["analysis"] is None]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(
            f"--reports {str(reports)!r}: no analyze.py report for {shown} (expected <reports>/<run>/metrics.json, "
            "written by scripts/study.sh analyze REPORT RUN); every run needs one"
        )
    _check_reports(runs, reports)
    _check_records(runs, groups, runs_dir)


def _check_reports(runs: dict, reports: Path) -> None:
    """Every MoE report has layers, the same ones, and every report read the same eval blocks."""
    moe = {
        n: tuple(sorted(r["analysis"].get("layers") or {})) for n, r in runs.items() if r["config"] != "dense"
    }
    empty = [n for n, layers in moe.items() if not layers]
    if empty:
        raise ConfigError(f"--reports {str(reports)!r}: the report of {empty[0]} has no MoE layer (an MoE run's "
                          "report has one entry per MoE layer)")  # fmt: skip
    pair = _two_that_differ(moe)
    if pair:
        a, b = pair
        raise ConfigError(
            f"--reports {str(reports)!r}: the reports of {a} and {b} analyse different MoE layers "
            f"({', '.join(moe[a])} vs {', '.join(moe[b])})"
        )
    fingerprint = {n: r["eval_set"]["fingerprint"] for n, r in runs.items()}
    pair = _two_that_differ(fingerprint)
    if pair:
        n1, n2 = pair
        raise ConfigError(
            f"--reports {str(reports)!r}: the reports of {n1} and {n2} read different eval blocks (eval_set "
            f"fingerprints {fingerprint[n1]} and {fingerprint[n2]}); every report must be analyze.py on the "
            "same blocks"
        )


def _check_records(runs: dict, groups: dict, runs_dir: Path) -> None:
    """Every run has a complete final eval record of the same blocks, a dense partner of its seed, at most
    20 seeds per arm, and the arms the tables compare with are there."""
    where = f"--runs {str(runs_dir)!r}"
    cut = [n for n, r in runs.items() if not eval_records(r["records"])]
    if cut:
        raise ConfigError(
            f"{where}: {', '.join(cut[:4])} has no final eval record (not trained to the end, or "
            "eval.final_split was not eval)"
        )
    final = {n: final_eval(r["records"]) for n, r in runs.items()}
    base = set(groups.get("dense", {}))
    unpaired = [(c, s) for c, seeds in groups.items() if c != "dense" and not c.endswith("(ddp)")
                for s in seeds if s not in base]  # fmt: skip
    if unpaired:
        raise ConfigError(f"{where}: seed {unpaired[0][1]} of {unpaired[0][0]} has no dense run "
                          "of the same seed (differences are paired by seed)")  # fmt: skip
    fps = {n: str(ev.get(keys.blocks_fingerprint())) for n, ev in final.items()}
    pair = _two_that_differ(fps)
    if pair:
        n1, n2 = pair
        raise ConfigError(
            f"{where}: the final evals of {n1} and {n2} read different blocks "
            f"(eval/blocks_fingerprint {fps[n1]} and {fps[n2]})"
        )
    needed = [keys.EVAL_LM_LOSS, *map(keys.domain_loss, DOMAINS)]
    no_loss = [n for n, ev in final.items() if not all(k in ev for k in needed)]
    if no_loss:
        raise ConfigError(f"{where}: the final eval record of {no_loss[0]} lacks "
                          f"{keys.EVAL_LM_LOSS} or a per-domain loss ({', '.join(DOMAINS)})")  # fmt: skip
    many = [c for c, seeds in groups.items() if len(seeds) > 20]
    if many:
        raise ConfigError(f"{where}: {many[0]} has {len(groups[many[0]])} seeds; the exact "
                          "sign-flip test enumerates 2^n sign patterns, so at most 20 seeds per arm")  # fmt: skip
    absent = [c for c in REQUIRED_ARMS if c not in groups]
    if absent:
        raise ConfigError(f"{where}: no runs of {', '.join(absent)} (the tables need "
                          f"{', '.join(REQUIRED_ARMS)})")  # fmt: skip


def _main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--reports", type=Path, required=True)
    ap.add_argument("--walls", type=Path, nargs="*", default=[], help="study_gpu.sh driver logs (wall times)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    if not args.runs.is_dir():
        raise ConfigError(f"--runs {str(args.runs)!r} is not a folder")
    check_out(args.out)
    bad = [str(f) for f in args.walls if not f.is_file()]
    if bad:
        raise ConfigError(f"--walls {bad[0]!r} is not a file (study_gpu.sh driver logs)")
    runs = load(args.runs, args.reports)
    groups = by_config(runs)
    check_complete(runs, groups, args.runs, args.reports)
    walls = {}
    for f in args.walls:
        for mt in re.finditer(r"^(\S+): rc 0, (\d+) s wall$", _read_text(f), re.M):
            walls[mt[1]] = float(mt[2])
    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".study_report.", dir=args.out))
    try:
        write_all(runs, groups, walls, staging)
        made = sorted(p for p in staging.rglob("*") if p.is_file())
        for f in made:  # every destination checked before the first file is moved in
            rel = f.relative_to(staging)
            dest = args.out / rel
            taken = [q for q in [rel, *rel.parents] if (args.out / q).exists()
                     and (args.out / q).is_dir() == (q == rel)]  # fmt: skip
            if taken:
                raise ConfigError(f"--out: {str(args.out / taken[0])!r} is in the way of {str(dest)!r} "
                                  "(a folder where a file goes, or a file where a folder goes)")  # fmt: skip
        for f in made:
            dest = args.out / f.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print((args.out / "study" / "tables.md").read_text())
    return 0


OUT_FILES = ("study/tables.md", "study/metrics", "study/trajectories", "figures")  # what write_all makes


def check_out(out: Path) -> None:
    """``ConfigError`` before any work when ``out`` (or a folder above it) is a file, or a path the report
    writes is taken by something of the other kind (a folder where a file goes, a file where a folder goes)."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {str(out)!r}: {str(p)!r} exists and is not a folder")
    for rel in OUT_FILES:
        p = out / rel
        if rel.endswith(".md") and p.is_dir():
            raise ConfigError(f"--out: {str(p)!r} is a folder; the report writes a file there")
        if not rel.endswith(".md") and p.exists() and not p.is_dir():
            raise ConfigError(f"--out: {str(p)!r} is a file; the report writes a folder there")


def write_all(runs: dict, groups: dict, walls: dict[str, float], out: Path) -> None:
    """Every output file of the report under ``out`` (a staging folder: ``_main`` moves them in)."""
    study, figs = out / "study", out / "figures"
    for sub in ("metrics", "trajectories"):
        (study / sub).mkdir(parents=True, exist_ok=True)
    for n, r in runs.items():
        if r["report_path"]:
            shutil.copyfile(r["report_path"], study / "metrics" / f"{n}.json")
        (study / "trajectories" / f"{n}.json").write_text(
            json.dumps(trajectory(r["records"]), separators=(",", ":"))
        )
    fig_loss(runs, groups, figs / "study_loss.png")
    fig_nmi(runs, groups, figs / "study_nmi.png")
    fig_trajectories(runs, groups, figs / "study_trajectories.png")
    main_s0 = groups["moe-top1"][min(groups["moe-top1"])]
    a = runs[main_s0]["analysis"]
    L = max(a["layers"], key=lambda k: a["layers"][k]["token_type_nmi"]["value"])
    figures.heatmap(np.asarray(a["layers"][L]["token_type_fractions"]), a["token_types"],
                    f"{main_s0}, layer {L}: code token type -> top-1 expert (row fractions)", 1 / 8,
                    figs / "study_token_types.png")  # fmt: skip
    L = max(a["layers"], key=lambda k: a["layers"][k]["domain_nmi"]["value"])
    figures.heatmap(np.asarray(a["layers"][L]["domain_expert_fractions"]), DOMAINS,
                    f"{main_s0}, layer {L}: domain -> top-1 expert (row fractions)", 1 / 8,
                    figs / "study_domain_expert.png")  # fmt: skip
    nb = groups["no-balance"][min(groups["no-balance"])]
    figures.collapse_trajectory(runs[nb]["records"], figs / "study_collapse.png")
    ev_set = next(iter(runs.values()))["eval_set"]
    blocks = f"{ev_set['blocks']} test blocks" + (" (all)" if ev_set.get("max_blocks") is None else "")
    tables = [
        f"## Final test loss (analyze.py on {blocks}, eval_set {ev_set['fingerprint']}; mean [95% CI over seeds])",
        loss_table(runs, groups),
        "## Paired difference to the dense control", paired_table(runs, groups),
        "## Domain-expert NMI per run (95% bootstrap CI over documents)", nmi_table(runs, groups),
        "## NMI over seeds", nmi_seed_table(runs, groups),
        "## Domain NMI against its baselines (mean [95% CI over seeds]; p: sign-flip test of mean 0)",
        baseline_seed_table(runs, groups),
        "## Domain-expert MI and its normalisations (mean over seeds)", normalisation_table(runs, groups),
        "## Throughput", speed_table(runs, groups, walls),
    ]  # fmt: skip
    (study / "tables.md").write_text("\n\n".join(tables) + "\n")


def main(argv: list[str] | None = None) -> int:
    """A missing or incomplete study: one ``error:`` line, exit status 2, nothing written."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
