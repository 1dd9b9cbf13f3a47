"""What the fused backends' ops share: autocast policy, entry checks, autograd set-up (the ops run with autocast off).

Under ``torch.autocast`` the matmul inputs are cast to the autocast dtype, as autocast would do for
the eager reference's ``@``; the routing weights stay as they are (float32 from the router). The triton backend
takes the parameters uncast instead (``cast_params=False``): it casts them inside its op and writes their gradients
in their own dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def cast_for_autocast(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to the autocast dtype if autocast is on for ``device_type``, else unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, enabled=False)


def check_dtypes(name: str, *tensors: torch.Tensor) -> torch.dtype:
    """The common dtype of ``tensors``; ValueError naming the backend if they differ."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{name} experts need x and all expert parameters in one dtype, got {dtypes}")
    return tensors[0].dtype


def backend_inputs(
    name: str,
    supported: tuple[bool, str],
    x_TD: torch.Tensor,
    *params: torch.Tensor,
    cast_params: bool = True,
) -> tuple[torch.Tensor, ...]:
    """A fast backend's entry: RuntimeError if it cannot run here (``supported`` = its ``is_supported``
    answer), else ``x_TD`` and the expert parameters cast for autocast and checked to share one dtype.
    ``cast_params=False``: the parameters stay in their own (common) dtype, x is cast for autocast; the backend
    casts the parameters itself and returns their gradients in their dtype (no cast kernels in the backward)."""
    ok, why = supported
    if not ok:
        raise RuntimeError(f"{name} experts cannot run: {why}")
    device_type = x_TD.device.type
    if cast_params or not torch.is_autocast_enabled(device_type):
        tensors = cast_for_autocast(device_type, x_TD, *params)
        check_dtypes(name, *tensors)
        return tensors
    check_dtypes(name, *params)
    return (*cast_for_autocast(device_type, x_TD), *params)


def saved_activations_only(ctx, *outputs: torch.Tensor) -> None:
    """In a forward op's ``setup_context``: its ``outputs`` beyond y are activations saved for the backward,
    not results. No gradient flows into them, and autograd must not materialise zero gradients for them (as
    large as the activations themselves) before calling the backward; the backward then gets None for
    every gradient that is not there (y's included, if y took no part in the loss)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def op_or_eager(op: Callable, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """The forward call of a fused backend: ``op`` (its custom op) while dynamo traces;
    otherwise ``forward`` (the op's body) under a plain ``torch.autograd.Function`` with the op's own
    ``setup_context`` and ``backward``: the same computation and gradients without the custom-op dispatch
    (~150 us of Python per call with autograd on a 2-core CPU; eager training is bound by the host)."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)

    return call
