#!/usr/bin/env python
"""Prepare the three-domain corpus and write it to a folder.

    python scripts/prepare_data.py --config configs/data/offline.yaml [key=value ...] --out DIR

Reads the ``data:`` block of the YAML (a whole run config works too), applies dotted overrides such as
``seq_len=64`` or ``domains.math.num_problems=500``, builds the corpus with the same library code the
trainer uses (``moe_emergence.data.build_corpus``) and writes ``train/`` and ``eval/``
(``save_to_disk``), ``tokenizer/`` and ``stats.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from moe_emergence.data import DataConfig, apply_overrides, build_corpus, default_offline_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", help="YAML file with a data: block (default: the built-in offline corpus)"
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--tokenizer", help="HF tokenizer name or folder (default: train a byte-level BPE)")
    parser.add_argument("--max-positions", type=int, help="model context length; seq_len must fit in it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data block")
    args = parser.parse_args(argv)

    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ValueError(f"--config {args.config}: expected a mapping with a 'data:' block")
        data = raw["data"]
    else:
        data = default_offline_config().to_dict()
    cfg = DataConfig.from_dict(apply_overrides(data, args.overrides))

    start = time.perf_counter()
    corpus = build_corpus(cfg, tokenizer=args.tokenizer, max_positions=args.max_positions)
    out = corpus.save(args.out)
    took = time.perf_counter() - start
    summary = {split: corpus.stats[split] for split in ("train", "eval")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} in {took:.1f}s (fingerprint {corpus.fingerprint}, cache hit: {corpus.cache_hit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
