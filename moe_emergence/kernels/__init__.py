"""Registry of the fast experts backends (see ``moe_emergence.experts`` for the shared signature).

``available_backends(device)`` lists the names that run on ``device``, fastest first;
``load_backend(name, device)`` returns the experts function or raises ``RuntimeError`` saying why it
cannot run there. Backend modules are imported lazily: ``triton`` is only imported when asked for.
The lookup is traceable by ``torch.compile`` (import statements and constants only, no ``importlib``
calls, which dynamo cannot trace): a compiled model resolves its backend at trace time, without a graph break.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from types import ModuleType

import torch

# name -> experts function in that backend's module; order = preference of "auto" (fastest first)
BACKENDS: dict[str, str] = {"triton": "triton_experts", "grouped_mm": "grouped_mm_experts"}
# whether the triton package is installed, checked once at import (without importing triton)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _module(name: str) -> ModuleType:
    if name == "triton":
        from moe_emergence.kernels import triton_experts as module
    else:
        from moe_emergence.kernels import grouped_mm as module
    return module


def _support(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "triton" and not HAS_TRITON:
        return False, "the triton package is not installed"
    return _module(name).is_supported(device)


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
    return getattr(_module(name), BACKENDS[name])
