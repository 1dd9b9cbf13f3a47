"""Analyse one or more runs on the SAME eval blocks: metrics.json, figures (PNG) and report.md.

``analyze_runs`` is what ``scripts/analyze.py`` and the notebook call. A dense control gets loss metrics
only; MoE runs also get routing metrics, weight divergence, router saturation against their checkpoints
and causal expert ablation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moe_emergence.analysis.ablation import check_ablation, expert_ablation
from moe_emergence.analysis.collect import Routing, collect_routing
from moe_emergence.analysis.markdown import write_report
from moe_emergence.analysis.metrics import router_saturation
from moe_emergence.analysis.report_figures import write_figures
from moe_emergence.analysis.runs import (
    EvalSet,
    Run,
    list_checkpoints,
    load_checkpoint_model,
    load_eval_set,
    load_model,
    load_run,
    load_tokenizer,
)
from moe_emergence.analysis.summarize import ablation_summary, routing_summary, weight_summary
from moe_emergence.config import BACKENDS
from moe_emergence.errors import ConfigError

REPORT_FILES = ("metrics.json", "report.md")


@dataclass
class RunAnalysis:
    """One analysed run: its folder, routing on the eval set, and the metrics.json section."""

    run: Run
    routing: Routing
    metrics: dict
    figures: dict[str, str] = field(default_factory=dict)


def find_parent(run: Run, device) -> torch.nn.Module | None:
    """The dense model the run was upcycled from, when it can still be found: a dense-phase checkpoint
    at ``model.upcycle_at_step``, or ``model.base`` when it is a local dense checkpoint folder and the run
    upcycled at step 0. None otherwise (then distance from the parent is reported as unknown)."""
    model_cfg = run.config.get("model") or {}
    at = int(model_cfg.get("upcycle_at_step") or 0)
    for step, folder, meta in list_checkpoints(run):
        if step == at and meta.get("phase") == "dense":
            return load_checkpoint_model(run, folder, device)
    base = model_cfg.get("base")
    if at == 0 and isinstance(base, str) and (Path(base) / "config.json").is_file():
        return load_model(base, device)
    return None


def step0_model(model, parent) -> torch.nn.Module | None:
    """The run's MoE model at step 0, before any MoE update: ``upcycle(parent, moe)`` with the final model's
    ``MoEConfig`` (its ``seed`` draws the expert perturbations and the router exactly as the trainer did,
    from a CPU generator), in eval mode on the parent's device. None when the parent is unknown."""
    if parent is None:
        return None
    from moe_emergence.upcycle import upcycle

    return upcycle(parent, model.config.moe).eval()


@contextmanager
def timed(run: Run, stage: str, on: bool):
    """With ``on``, print ``analyze: <run>: <stage> <seconds> s`` to stderr when the stage ends (one line
    each, also with the progress bars off: where a long analysis spends its time)."""
    start = time.perf_counter()
    yield
    if on:
        print(
            f"analyze: {run.name}: {stage} {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True
        )


def saturation_vs_checkpoints(
    run: Run, routing: Routing, eval_set: EvalSet, tokenizer, batch_size, device, progress, backend=None
) -> dict:
    """Router saturation of every MoE-phase checkpoint against the final model, per layer (OLMoE)."""
    out = {}
    for step, folder, meta in list_checkpoints(run):
        if meta.get("phase", "moe") != "moe":
            continue
        model = load_checkpoint_model(run, folder, device, backend)
        if not hasattr(model, "moe_layers"):
            continue
        r = collect_routing(model, eval_set, tokenizer, batch_size, progress, desc=f"routing step {step}")
        out[str(step)] = {str(L): router_saturation(r.topk[L], routing.topk[L]) for L in routing.layers}
    return out


def analyze_run(
    run: Run,
    eval_set: EvalSet,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 8,
    ablation: bool = True,
    saturation: bool = True,
    device: str = "cpu",
    progress: bool = True,
    n_perm: int = 1000,
    step0: bool = True,
    backend: str = "eager",
    timings: bool = False,
) -> RunAnalysis:
    """Collect routing on ``eval_set`` and compute every metric of one run; with ``step0`` (MoE runs whose
    parent is known) also route the eval set through the step-0 model (``step0_model``) and compare.
    MoE experts run through ``backend`` (default ``"eager"``, the reference; any ``MoEConfig.backend``);
    ``timings`` prints each stage's seconds to stderr (``timed``)."""
    tokenizer = load_tokenizer(run)
    model = load_model(run.final_dir, device, backend)
    with timed(run, "routing", timings):
        routing = collect_routing(
            model, eval_set, tokenizer, batch_size, progress, desc=f"routing {run.name}"
        )
    parent = find_parent(run, device) if routing.topk else None
    routing0 = None
    if step0 and parent is not None:
        m0 = step0_model(model, parent)
        with timed(run, "routing at step 0", timings):
            routing0 = collect_routing(
                m0, eval_set, tokenizer, batch_size, progress, desc=f"routing step 0 {run.name}"
            )
    with timed(run, "routing statistics (bootstrap, null baselines)", timings):
        summary = routing_summary(routing, n_boot, seed, n_perm, routing0)
    out = {"run_dir": str(run.path), "model_type": run.model_type, **summary}
    if routing.topk:
        out["weights"] = weight_summary(model, parent)
        out["parent_known"] = parent is not None
        if saturation:
            with timed(run, "saturation against checkpoints", timings):
                out["saturation"] = saturation_vs_checkpoints(
                    run, routing, eval_set, tokenizer, batch_size, device, progress, backend
                )
        if ablation:
            base_nll_BS = np.full(eval_set.input_ids.shape, np.nan)
            base_nll_BS[routing.block, routing.pos] = routing.nll
            with timed(run, "expert ablation", timings):
                abl = expert_ablation(model, eval_set, batch_size, progress, base_nll_BS=base_nll_BS)
                out["ablation"] = ablation_summary(abl, routing, n_boot, seed)
    return RunAnalysis(run=run, routing=routing, metrics=out)


def check_out_dir(out: str | Path) -> None:
    """The report folder may be missing, empty, or hold an earlier report (whose files are replaced);
    anything else is refused so nothing unrelated is overwritten."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {str(out)!r} is a link to nothing; give a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {str(out)!r}: {str(above)!r} is a file, so no folder can be made under it")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise ConfigError(f"--out {str(out)!r} is not empty and holds no earlier report; choose a new folder")


def analyze_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    max_blocks: int | None = 64,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 8,
    ablation: bool = True,
    saturation: bool = True,
    device: str = "cpu",
    progress: bool = True,
    n_perm: int = 1000,
    step0: bool = True,
    backend: str = "eager",
    timings: bool = False,
) -> tuple[dict, list[RunAnalysis]]:
    """Analyse runs on the eval blocks of the first run and write metrics.json, figures and report.md.

    Every run must rebuild exactly the same eval blocks (same data config and tokenizer); otherwise a
    ``ConfigError`` names the run, since numbers on different blocks are not comparable. MoE experts run
    through ``backend`` (``"eager"``, the reference, by default: a fast path's tuning and numerics stay out
    of the numbers); a name that is not an ``MoEConfig.backend`` is a ``ConfigError``. ``timings`` prints
    one line per stage and run to stderr (``scripts/analyze.py`` turns it on).
    """
    if not run_dirs:
        raise ConfigError("no run folder given")
    if backend not in BACKENDS:
        raise ConfigError(f"experts backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    runs = [load_run(p) for p in run_dirs]  # checks every folder before any work
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run folders must have distinct names, got {names}")
    check_out_dir(out_dir)
    if ablation:
        for r in runs:
            check_ablation(r)
    eval_set = load_eval_set(runs[0], load_tokenizer(runs[0]), max_blocks)
    for r in runs[1:]:
        other = load_eval_set(r, load_tokenizer(r), max_blocks)
        if other.fingerprint != eval_set.fingerprint or other.domains != eval_set.domains:
            raise ConfigError(
                f"run {r.name!r} rebuilds different eval blocks than {runs[0].name!r} (data config or tokenizer "
                "differ); compare only runs trained on the same data with the same tokenizer"
            )
    out = Path(out_dir)
    analyses = [
        analyze_run(
            r,
            eval_set,
            n_boot,
            seed,
            batch_size,
            ablation,
            saturation,
            device,
            progress,
            n_perm,
            step0,
            backend,
            timings,
        )
        for r in runs
    ]
    result = {
        "eval_set": {
            "fingerprint": eval_set.fingerprint,
            "blocks": int(eval_set.input_ids.shape[0]),
            "seq_len": int(eval_set.input_ids.shape[1]),
            "domains": eval_set.domains,
            "max_blocks": max_blocks,
        },
        "experts_backend": backend,
        "bootstrap": {
            "n_boot": n_boot,
            "seed": seed,
            "level": 0.95,
            "unit": "document, stratified by domain",
        },
        "permutation": {
            "n_perm": n_perm,
            "seed": seed,
            "unit": "documents' domain labels, shuffled across all documents",
        },
        "runs": {a.run.name: a.metrics for a in analyses},
    }
    write_report_files(out, result, analyses, eval_set)
    return result, analyses


def write_report_files(out: Path, result: dict, analyses: list[RunAnalysis], eval_set: EvalSet) -> None:
    """Write the figures, metrics.json and report.md into a staging folder beside ``out`` and move them
    into ``out`` only once all are written: a failure part-way leaves an earlier report in ``out`` as it
    was (and no new ``out``). Each analysis's ``figures`` then points into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_figures(staging, analyses, eval_set)
        (staging / "metrics.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=True) + "\n")
        write_report(staging, result, analyses)
        out.mkdir(exist_ok=True)
        for src in sorted(f for f in staging.rglob("*") if f.is_file()):
            dest = out / src.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(staging)
    for a in analyses:
        a.figures = {k: out / Path(v).relative_to(staging) for k, v in a.figures.items()}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
