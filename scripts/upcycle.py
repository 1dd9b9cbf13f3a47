"""Upcycle a dense GPT-2 checkpoint into an MoE model without training, and save it.

    python scripts/upcycle.py SOURCE OUT [key=value ...]

SOURCE is a hub id or a local GPT-2 folder; the overrides set ``MoEConfig`` fields, e.g.
``num_experts=8 top_k=1 layers=[8,9,10,11] init=noise``. OUT gets ``save_pretrained`` files (and the
source's tokenizer when it has one), loadable with ``AutoModelForCausalLM`` after ``import moe_emergence``.
"""

import argparse
import sys
from pathlib import Path

from moe_emergence import MoEConfig, upcycle
from moe_emergence.training.loader import ConfigError, apply_overrides, build

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="hub id or local GPT-2 checkpoint folder")
    p.add_argument("out", help="output folder")
    p.add_argument("overrides", nargs="*", help="MoEConfig fields as key=value")
    args = p.parse_args(argv)
    try:
        cfg = build(MoEConfig, apply_overrides({}, args.overrides))
        model = upcycle(args.source, cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    model.save_pretrained(out)
    src = Path(args.source)
    if src.is_dir() and not any((src / f).exists() for f in TOKENIZER_FILES):
        print(f"note: {src} has no tokenizer files; saved the model only")
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.source).save_pretrained(out)
    E, layers = cfg.num_experts, model.config.moe_layers
    print(
        f"upcycled {args.source} -> {out}: {E} experts (top-{cfg.top_k}, init={cfg.init}) in blocks {layers}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
