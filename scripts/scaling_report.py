"""Summarise the runs of ``scripts/gpu_scaling.sh`` into one JSON file.

    python scripts/scaling_report.py REPORT_DIR --runs 3 --fsdp-final runs/scaling/fsdp_ckpt/final --out FILE

Writes ``{"date", "gpu", "ddp_efficiency", "fsdp_efficiency", "eq_loss_diff", "fsdp_resume_ok",
"fsdp_final_ok", "tokens_per_s": {"one": [...], "ddp": [...], "fsdp": [...]}, "warmup_steps",
"measured_steps"}``:
- tokens/s of a run: the tokens of steps ``warmup+1 .. last`` over their wall time, from the trainer's
  ``perf/tokens_per_sec`` records (each covers the ``log.every`` steps before it; equal token counts, so the
  run's rate is their harmonic mean);
- weak-scaling efficiency: median tokens/s on 2 GPUs / (2 x median tokens/s on 1 GPU), batch 8 per GPU;
- ``eq_loss_diff``: the largest |train/loss| gap at equal steps between 1 GPU x 2B and DDP 2 x B;
- ``fsdp_resume_ok``: the FSDP2 run stopped at step 5 with a checkpoint, resumed from it, and its metrics hold
  every step 1..10 once; ``fsdp_final_ok``: its gathered ``final/`` loads and every weight is finite.
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moe_emergence.console import ArgumentParser  # noqa: E402
from moe_emergence.errors import run_cli  # noqa: E402
from moe_emergence.telemetry import names as keys  # noqa: E402
from moe_emergence.telemetry import read_metrics  # noqa: E402


def tokens_per_s(path: Path, warmup: int) -> float:
    """Harmonic mean of the ``perf/tokens_per_sec`` records after step ``warmup``."""
    rates = [
        r[keys.TOKENS_PER_SEC] for r in read_metrics(path) if keys.TOKENS_PER_SEC in r and r["step"] > warmup
    ]
    if not rates:
        raise SystemExit(f"error: {path}: no {keys.TOKENS_PER_SEC} record after step {warmup}")
    return statistics.harmonic_mean(rates)


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r[keys.TRAIN_LOSS] for r in read_metrics(path) if keys.TRAIN_LOSS in r}


def eq_loss_diff(report: Path) -> float:
    a, b = losses(report / "eq1.jsonl"), losses(report / "eq2.jsonl")
    if sorted(a) != sorted(b) or not a:
        raise SystemExit(f"error: eq1/eq2 logged different steps: {sorted(a)} vs {sorted(b)}")
    return max(abs(a[s] - b[s]) for s in a)


def fsdp_resume_ok(report: Path) -> bool:
    steps = [r["step"] for r in read_metrics(report / "fsdp_resume.jsonl") if keys.TRAIN_LOSS in r]
    resumed = "resumed from" in (report / "fsdp_resume.log").read_text()
    return resumed and steps == list(range(1, 11))


def fsdp_final_ok(final: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    import moe_emergence  # noqa: F401  (registers gpt2_moe)

    model = AutoModelForCausalLM.from_pretrained(final)
    return type(model).__name__ == "GPT2MoEForCausalLM" and all(
        torch.isfinite(p).all() for p in model.parameters()
    )


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--fsdp-final", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    r = args.report
    tps = {
        kind: [tokens_per_s(r / f"{prefix}_{i}.jsonl", args.warmup) for i in range(1, args.runs + 1)]
        for kind, prefix in (("one", "tp1"), ("ddp", "ddp"), ("fsdp", "fsdp"))
    }
    one = statistics.median(tps["one"])
    last = max(s["step"] for s in read_metrics(r / "tp1_1.jsonl"))
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_name(),
        "ddp_efficiency": round(statistics.median(tps["ddp"]) / (2 * one), 4),
        "fsdp_efficiency": round(statistics.median(tps["fsdp"]) / (2 * one), 4),
        "eq_loss_diff": eq_loss_diff(r),
        "fsdp_resume_ok": fsdp_resume_ok(r),
        "fsdp_final_ok": fsdp_final_ok(args.fsdp_final),
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in tps.items()},
        "warmup_steps": args.warmup,
        "measured_steps": last - args.warmup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
