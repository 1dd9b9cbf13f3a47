"""Command line of ``scripts/train.py``: ``[--config FILE] [--resume auto|PATH] [--overwrite] [key=value ...]``.

Exit status:
  0    finished (``final/`` written) or ended a ``train.stop_after`` time slice (checkpoint written), or
       the run folder already holds this finished run (nothing to do: it says where the results are)
  2    a user mistake (bad config, base checkpoint, data, run folder, resume checkpoint): one ``error:``
       line on stderr, no traceback, nothing written
  3    the collapse guard stopped the run (``collapse.action: stop``; checkpoint and final/ written)
  4    the bad-step guard stopped the run (``guard.max_consecutive_skips``; checkpoint of the verified state)
  130, 143  SIGINT / SIGTERM: the current step finished and a checkpoint was written (``--resume auto``)
Anything else is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import sys

from moe_emergence.console import ArgumentParser, quiet_libraries
from moe_emergence.errors import run_cli

EXIT_COLLAPSE = 3
EXIT_NONFINITE = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="train.py",
        description="Train GPT-2 -> MoE with routing telemetry (default config: configs/quickstart.yaml).",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/quickstart.yaml)")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest intact checkpoint of the run folder, or from scratch) or a checkpoint folder",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.steps=500 model.moe.top_k=2 (an MoE config)",
    )
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from moe_emergence.training.config import load_config
    from moe_emergence.training.rundir import RunFinished
    from moe_emergence.training.trainer import Stop, Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except RunFinished as done:  # the same command again: say where the results are
        print(done)
        return 0
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        end = f", stopped: {result.stopped.value}" if result.stopped else ""
        print(f"run folder: {result.run_dir} (step {result.step}{end})")
    if result.stopped is Stop.NONFINITE:
        print(f"error: {result.message}", file=sys.stderr)
        return EXIT_NONFINITE
    if result.stopped is Stop.SIGNAL:
        return 128 + result.signal
    return EXIT_COLLAPSE if result.stopped is Stop.COLLAPSE else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)
