"""Registry of the fast experts backends (see ``moe_emergence.experts`` for the shared signature).

``available_backends(device, d_model, d_ff)`` lists the names that run on ``device`` (for those expert sizes),
fastest first;
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

# name -> experts function in that backend's module; order = preference of "auto" (fastest first: on the H100
# triton takes less device time and memory than grouped_mm and trains as fast or faster; docs/benchmarks.md)
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


def available_backends(
    device: torch.device | str, d_model: int | None = None, d_ff: int | None = None
) -> list[str]:
    """Fast backends that run on ``device``, fastest first (``eager`` always runs and is not listed); with the
    expert sizes given, only those that take them (grouped_mm needs multiples of 8, see ``grouped_mm.fits``)."""
    names = [name for name in BACKENDS if _support(name, torch.device(device))[0]]
    if d_model is not None and d_ff is not None:
        names = [n for n in names if n != "grouped_mm" or _module(n).fits(d_model, d_ff)]
    return names


def unsupported_reason(name: str, device: torch.device | str) -> str | None:
    """Why fast backend ``name`` cannot run on ``device``, or None when it can (checked before a run starts)."""
    ok, why = _support(name, torch.device(device))
    return None if ok else why


def load_backend(name: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The experts function of backend ``name``; RuntimeError if it cannot run on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown fast experts backend {name!r}; allowed: {sorted(BACKENDS)}")
    ok, why = _support(name, torch.device(device))
    if not ok:
        raise RuntimeError(f"experts backend {name!r} cannot run on {device}: {why}")
    return getattr(_module(name), BACKENDS[name])
