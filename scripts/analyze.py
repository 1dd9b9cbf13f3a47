"""Analyse finished runs: routing on the shared eval blocks, specialisation metrics with CIs, figures, report.

    python scripts/analyze.py RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--max-blocks N] [--bootstrap N]
        [--permutations N] [--seed S] [--batch-size N] [--device cpu|cuda] [--backend eager] [--no-step0]

Writes REPORT_DIR/metrics.json, REPORT_DIR/report.md and PNG figures (see docs/analysis.md). A thin wrapper
over ``moe_emergence.analysis.analyze_runs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_emergence.console import ArgumentParser  # noqa: E402  (after the path line: a run from a clone)
from moe_emergence.errors import ConfigError, run_cli  # noqa: E402


def _bad_flag(args) -> str | None:
    """The first flag with a value it does not take, described (None when all are fine)."""
    for flag, value, least in (
        ("--max-blocks", args.max_blocks, 0),
        ("--bootstrap", args.bootstrap, 0),
        ("--permutations", args.permutations, 0),
        ("--seed", args.seed, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < least:
            return f"{flag} {value}: an integer >= {least}"
    from moe_emergence.config import BACKENDS

    if args.backend not in BACKENDS:
        return f"--backend {args.backend!r}: one of {', '.join(BACKENDS)}"
    if args.device != "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")):
        return f"--device {args.device!r}: cpu, cuda or cuda:N"
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            return f"--device {args.device}: no CUDA GPU here (torch {torch.__version__}); use --device cpu"
    if args.backend not in ("auto", "eager"):
        from moe_emergence.kernels import unsupported_reason

        why = unsupported_reason(args.backend, args.device)
        if why:
            return f"--backend {args.backend!r} cannot run on {args.device} ({why}); use eager or auto"
    return None


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (the first one's eval blocks are used for all)",
    )
    p.add_argument(
        "--out", required=True, metavar="REPORT_DIR", help="report folder (new, empty, or an earlier report)"
    )
    p.add_argument(
        "--max-blocks",
        type=int,
        default=64,
        help="eval blocks, split evenly over domains (0 = all; default 64)",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates over documents (default 1000)"
    )
    p.add_argument(
        "--permutations",
        type=int,
        default=1000,
        help="shuffles of the documents' domain labels for the null baselines (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the permutations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--no-ablation", action="store_true", help="skip causal expert ablation (one eval pass per expert)"
    )
    p.add_argument("--no-saturation", action="store_true", help="skip router saturation against checkpoints")
    p.add_argument(
        "--no-step0", action="store_true", help="skip routing the re-upcycled step-0 model (one eval pass)"
    )
    p.add_argument(
        "--backend",
        default="eager",
        help="experts backend of the MoE runs: eager (the reference, default), grouped_mm, triton or auto",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    bad = _bad_flag(args)
    if bad:
        raise ConfigError(bad)

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:  # fail fast, before the heavy imports
        raise ConfigError(f"run folder {missing[0]!r} does not exist or is not a folder")

    from moe_emergence.analysis import analyze_runs

    analyze_runs(
        args.runs,
        args.out,
        max_blocks=args.max_blocks or None,
        n_boot=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        ablation=not args.no_ablation,
        saturation=not args.no_saturation,
        device=args.device,
        progress=not args.no_progress,
        n_perm=args.permutations,
        step0=not args.no_step0,
        backend=args.backend,
        timings=True,
    )
    print(f"wrote {Path(args.out) / 'report.md'} and {Path(args.out) / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """A user mistake (``ConfigError``) is one ``error:`` line and exit 2; anything else keeps its traceback."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
