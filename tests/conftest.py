"""Shared fixtures. Until the data package lands, install the contract stand-in as moe_emergence.data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_spec = importlib.util.find_spec("moe_emergence.data")
if _spec is None or _spec.origin is None:  # missing or an empty namespace dir. TEMPORARY: remove after merge
    sys.path.insert(0, str(TESTS))
    import _data_contract

    sys.modules["moe_emergence.data"] = _data_contract
