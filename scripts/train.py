"""Train a run: ``[accelerate launch] scripts/train.py [--config configs/X.yaml] [--resume auto] [key=value ...]``.

With no arguments it runs ``configs/quickstart.yaml`` (tiny GPT-2, offline corpus, dense -> upcycle -> MoE).
"""

import sys

from moe_emergence.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
