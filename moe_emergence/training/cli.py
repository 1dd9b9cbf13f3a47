"""Command line of ``scripts/train.py``: ``[--config FILE] [--resume auto|PATH] [--overwrite] [key=value ...]``.

User mistakes (bad config, occupied run folder, bad resume path) print one ``error:`` line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from moe_emergence.training.loader import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train GPT-2 -> MoE with routing telemetry (default config: configs/quickstart.yaml).",
    )
    p.add_argument("--config", default=None, help="YAML run config (default: configs/quickstart.yaml)")
    p.add_argument(
        "--resume", default=None, help="'auto' (latest checkpoint of the run folder) or a checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.moe.top_k=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moe_emergence.training.config import load_config
    from moe_emergence.training.trainer import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(
            f"run folder: {result.run_dir} (step {result.step}{', stopped: ' + result.stopped if result.stopped else ''})"
        )
    return 3 if result.stopped == "collapse" else 0
