"""Registry of the fast experts backends (see ``moe_emergence.experts`` for the shared signature).

``available_backends(device)`` lists the names that run on ``device``, fastest first;
``load_backend(name, device)`` returns the experts function or raises ``RuntimeError`` saying why it
cannot run there. Backend modules are imported lazily: ``triton`` is only imported when asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch

# name -> (module, function); order = preference of "auto" (fastest first)
BACKENDS: dict[str, tuple[str, str]] = {
    "triton": ("moe_emergence.kernels.triton_experts", "triton_experts"),
    "grouped_mm": ("moe_emergence.kernels.grouped_mm", "grouped_mm_experts"),
}


def _support(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    module = importlib.import_module(BACKENDS[name][0])
    return module.is_supported(torch.device(device))


def available_backends(device: torch.device | str) -> list[str]:
    """Fast backends that run on ``device``, fastest first (``eager`` always runs and is not listed)."""
    return [name for name in BACKENDS if _support(name, torch.device(device))[0]]


def load_backend(name: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The experts function of backend ``name``; RuntimeError if it cannot run on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fast experts backend {name!r}; allowed: {sorted(BACKENDS)}")
    ok, why = _support(name, torch.device(device))
    if not ok:
        raise RuntimeError(f"experts backend {name!r} cannot run on {device}: {why}")
    module_name, fn_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), fn_name)
