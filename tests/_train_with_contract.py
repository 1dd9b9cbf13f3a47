"""TEMPORARY launcher for the end-to-end test until the data package lands: installs the data-contract
stand-in, then runs the real command line (``moe_emergence.training.cli.main``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402,F401  (installs moe_emergence.data if missing)

from moe_emergence.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
