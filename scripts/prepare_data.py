#!/usr/bin/env python
"""Prepare the three-domain corpus and write it to a folder.

    python scripts/prepare_data.py --config configs/data/offline.yaml [key=value ...] --out DIR

Reads the ``data:`` block of the YAML (a whole run config works too), applies dotted overrides such as
``seq_len=64`` or ``domains.math.num_problems=500``, builds the corpus with the same library code the
trainer uses (``moe_emergence.data.build_corpus``) and writes ``train/``, ``val/`` and ``eval/``
(``save_to_disk``), ``tokenizer/`` and ``stats.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moe_emergence.config_loader import load
from moe_emergence.console import ArgumentParser, quiet_libraries
from moe_emergence.data import DataConfig, build_corpus, default_offline_config
from moe_emergence.errors import ConfigError, as_user_error, run_cli


def _main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML file with a data: block (default: the built-in offline corpus)"
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--tokenizer", help="HF tokenizer name or folder (default: train a byte-level BPE)")
    parser.add_argument("--max-positions", type=int, help="model context length; seq_len must fit in it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data block")
    args = parser.parse_intermixed_args(argv)  # overrides on either side of the options

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder; choose a new one")
    # the config loader: base: inheritance, file and line of a bad key, overrides relative to the data: block
    default = None if args.config else {"data": default_offline_config().to_dict()}
    cfg = load(DataConfig, args.config, data=default, overrides=args.overrides, section="data")

    start = time.perf_counter()
    with as_user_error("data"):
        corpus = build_corpus(cfg, tokenizer=args.tokenizer, max_positions=args.max_positions)
    out = corpus.save(out)
    took = time.perf_counter() - start
    summary = {split: corpus.stats[split] for split in ("train", "val", "eval")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} in {took:.1f}s (fingerprint {corpus.fingerprint}, cache hit: {corpus.cache_hit})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """User mistakes: one ``error:`` line and exit status 2; nothing is written to ``--out``."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
