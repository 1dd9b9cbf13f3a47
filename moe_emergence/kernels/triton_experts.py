"""``triton`` backend: ScatterMoE-style expert MLPs on the Triton kernels of ``triton_kernels``, registered as
``torch.library`` ops so that ``torch.compile`` keeps them in its graph (no graph break).

Shapes (legend: docs/architecture.md): T tokens, D model width, F expert intermediate width, E experts,
K experts per token, A = T * K assignments.
Rows ``*_A?`` are in the expert-sorted order of ``routing_meta``; token-order tensors are ``*_T?``.
Zero-weight assignments are the dead rows ``offsets[E]:A`` (``routing_meta`` docstring): no kernel computes
them (their rows of z, a, dO, dZ stay unwritten); the scattering GEMMs write zeros to their slots of y and
dX and the dO pass a zero d(weight).

Forward:  z, a = gelu(x[token] @ w1 + b1) (sorted);  y[slot] = w[slot] * (a @ w2 + b2), slot = assignment
          t*K+k; for K > 1 the K slots of a token are summed in float32 afterwards (no atomics:
          deterministic).
Backward: dO = w * dy[token] and db2 (column sums of dO per expert) in one pass; dZ = (dO @ w2^T) * gelu'(z)
          and db1 (its column sums, in the GEMM's epilogue); dW2 = a^T dO; dW1 = x_A^T dZ with x_A = x[token]
          in sorted order (copied once dO is freed: the same size, so not at the backward's peak; gathering
          the rows inside the GEMM costs more device time); dX slots = dZ @ w1^T summed over K;
          d(weight) = <dy[token], o> with o = a @ w2 + b2 the unscaled expert output, computed without keeping o
          (an [A, D] activation): <dy, b2[e]> in the dO pass plus <dO @ w2^T, a> / w = <dy, a @ w2> in the dZ
          GEMM's epilogue (a = gelu(z) from the z it reads anyway). That term is recovered from dO = w dy as
          rounded in x's dtype, so, like the expert parameters' gradients, it loses precision where |w dy| falls
          below the dtype's normal range (float16: 6e-5, which fp16 loss scaling keeps it above; bfloat16 has
          float32's range); a subnormal w drops it.

Ops (``triton_launch.triton_op``: on the GPU, Inductor traces their bodies and launches the kernels from its own
code, with fixed tiles and no TMA loads, except where it replays the graphs from CUDA graphs (``reduce-overhead``):
there they stay opaque (their ``*_graphed`` twins) and launch autotuned, TMA-loading kernels; under the
interpreter they are opaque; their fake implementations give shapes and dtypes only):
  ``moe_emergence::triton_experts_fwd(x, w1, b1, w2, b2, weights, order, token, expert, offsets)``
      -> ``(y_TD, z_AF, a_AF, w1c, w2c)``; the rest after y is what the backward needs: w1c, w2c are the
      weights cast to x's dtype (empty where they are in it already). The parameters may be in another dtype
      than x (float32 masters under autocast): the op casts the weights itself and reads the biases as they are.
  ``moe_emergence::triton_experts_bwd(dy, x, w1, w2, b2, z, a, weights, order, token, expert, offsets,
      param_dtype, needs)`` -> ``(dx, dw1, db1, dw2, db2, dweights)``; the parameter gradients in
      ``param_dtype``, written so by the kernels (their float32 sums; no cast kernels), a gradient whose
      ``needs`` flag is False is not computed and comes back as an empty tensor (None to autograd).
``register_autograd`` ties them together; outside ``torch.compile`` the same bodies run under a plain
``autograd.Function`` (``op_common.op_or_eager``: no custom-op dispatch cost). The routing metadata is computed
before the ops (``triton_routing``: its own op, no host sync) and passed as its four tensors. Both ops run with
autocast off; ``triton_experts`` casts the inputs for autocast before calling them (``kernels/op_common.py``).
"""

from __future__ import annotations

import torch

from moe_emergence.kernels import triton_kernels, triton_rowwise
from moe_emergence.kernels.op_common import (
    autocast_off,
    backend_inputs,
    op_or_eager,
    saved_activations_only,
)
from moe_emergence.kernels.routing_meta import RoutingMeta
from moe_emergence.kernels.triton_kernels import EPI_GELU, EPI_GELU_BWD, launch_rows, launch_wgrad
from moe_emergence.kernels.triton_launch import INTERPRET, triton_op
from moe_emergence.kernels.triton_routing import triton_routing_meta
from moe_emergence.kernels.triton_rowwise import launch_bwd_prep, to_tokens

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
Tensor = torch.Tensor


def _compute_copy(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``w`` cast to the compute dtype, saved for the backward; empty if ``w`` is in it already (an op's output
    may not alias its input: the backward then takes ``w`` itself)."""
    return w.new_empty(0, dtype=dtype) if w.dtype == dtype else w.to(dtype)


def _for_kernels(w: Tensor, copy: Tensor) -> Tensor:
    """The weight the kernels read: its ``_compute_copy``, or ``w`` itself where that is empty."""
    return copy if copy.numel() else w


def _fwd_impl(
    x_TD: Tensor, w1_EDF: Tensor, b1_EF: Tensor, w2_EFD: Tensor, b2_ED: Tensor, weights_TK: Tensor,
    order_A: Tensor, token_A: Tensor, expert_A: Tensor, offsets_E1: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    meta = RoutingMeta(order_A, token_A, expert_A, offsets_E1, w1_EDF.shape[0], weights_TK.shape[1])
    T, D = x_TD.shape
    A, F = order_A.numel(), w1_EDF.shape[2]
    with autocast_off(x_TD.device.type):
        w1c, w2c = _compute_copy(w1_EDF, x_TD.dtype), _compute_copy(w2_EFD, x_TD.dtype)
        w1k, w2k = _for_kernels(w1_EDF, w1c), _for_kernels(w2_EFD, w2c)
        z_AF = torch.empty(A, F, device=x_TD.device, dtype=x_TD.dtype)
        a_AF = torch.empty_like(z_AF)
        launch_rows(x_TD, w1k, a_AF, meta, bias=b1_EF, aux=z_AF, gather=True, epilogue=EPI_GELU)
        y_TD = to_tokens(
            lambda out: launch_rows(a_AF, w2k, out, meta, bias=b2_ED, scale=weights_TK, scatter=True),
            meta, T, D, x_TD,
        )  # fmt: skip
    return y_TD, z_AF, a_AF, w1c, w2c


def _fwd_fake(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, order_A, token_A, expert_A, offsets_E1):
    (T, D), A, F = x_TD.shape, order_A.shape[0], w1_EDF.shape[2]
    z_AF = x_TD.new_empty(A, F)
    return (
        x_TD.new_empty(T, D),
        z_AF,
        torch.empty_like(z_AF),
        x_TD.new_empty(w1_EDF.shape if w1_EDF.dtype != x_TD.dtype else (0,)),
        x_TD.new_empty(w2_EFD.shape if w2_EFD.dtype != x_TD.dtype else (0,)),
    )


# the backward's kernels under the forward op too: only the forward op is in the graph torch's cache keys
_KERNELS = [*triton_kernels.KERNELS, *triton_rowwise.KERNELS]
triton_experts_fwd = triton_op("moe_emergence::triton_experts_fwd", _fwd_impl, _KERNELS, _fwd_fake)


def _bwd_impl(
    dy_TD: Tensor, x_TD: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, b2_ED: Tensor, z_AF: Tensor, a_AF: Tensor,
    weights_TK: Tensor, order_A: Tensor, token_A: Tensor, expert_A: Tensor, offsets_E1: Tensor,
    param_dtype: torch.dtype, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    meta = RoutingMeta(order_A, token_A, expert_A, offsets_E1, w1_EDF.shape[0], weights_TK.shape[1])
    need_x, need_w1, need_b1, need_w2, need_b2, need_weights = needs
    T, D = x_TD.shape
    dx_TD = dw1 = db1 = dw2 = db2 = dweights_TK = None
    with autocast_off(x_TD.device.type):
        do_AD, dw_A, db2 = launch_bwd_prep(
            dy_TD, b2_ED, weights_TK, meta, want_dweights=need_weights, bias_grad=need_b2, grad_dtype=param_dtype,
        )  # fmt: skip
        if need_x or need_w1 or need_b1 or need_weights:
            dz_AF = torch.empty_like(z_AF)
            db1 = launch_rows(
                do_AD, w2_EFD.transpose(1, 2), dz_AF, meta, aux=z_AF, epilogue=EPI_GELU_BWD, bias_grad=need_b1,
                grad_dtype=param_dtype, row_dots=(weights_TK, dw_A) if need_weights else None,
            )  # fmt: skip
        if need_weights:  # dw_A: <dy, b2> from the dO pass plus <dy, a w2> from the dZ GEMM
            dweights_TK = dw_A.view(T, meta.top_k).to(weights_TK.dtype)
        if need_w2:
            dw2 = launch_wgrad(a_AF, do_AD, meta, param_dtype)
        del do_AD  # freed before dW1 and dX are allocated: the backward's peak
        # x in sorted order: a copy in dO's freed place, itself freed before the dX slots (same size). Where x
        # needs no gradient (no dX slots) it can raise the backward's peak, by at most its own size.
        if need_w1:
            dw1 = launch_wgrad(x_TD.index_select(0, meta.token_A), dz_AF, meta, param_dtype)
        if need_x:  # slots in x's dtype: 16-bit slots halve the backward's peak at fine-grained shapes
            dx_TD = to_tokens(
                lambda out: launch_rows(dz_AF, w1_EDF.transpose(1, 2), out, meta, scatter=True),
                meta, T, D, x_TD, slot_dtype=x_TD.dtype,
            )  # fmt: skip
    grads = (dx_TD, dw1, db1, dw2, db2, dweights_TK)
    # not asked for: an empty tensor each (outputs may not alias one another)
    return tuple(g if need else x_TD.new_empty(0) for g, need in zip(grads, needs, strict=True))


def _bwd_fake(dy_TD, x_TD, w1_EDF, w2_EFD, b2_ED, z_AF, a_AF, weights_TK, order_A, token_A, expert_A, offsets_E1,
      param_dtype, needs):  # fmt: skip
    E, D, F = w1_EDF.shape
    shapes = [x_TD.shape, w1_EDF.shape, (E, F), w2_EFD.shape, (E, D)]
    dtypes = [x_TD.dtype] + [param_dtype] * 4
    out = [
        x_TD.new_empty(s if need else (0,), dtype=dt if need else x_TD.dtype)
        for s, dt, need in zip(shapes, dtypes, needs[:5], strict=True)
    ]
    out.append(torch.empty_like(weights_TK) if needs[5] else x_TD.new_empty(0))
    return tuple(out)


triton_experts_bwd = triton_op("moe_emergence::triton_experts_bwd", _bwd_impl, _KERNELS, _bwd_fake)


def _setup_context(ctx, inputs, output) -> None:
    x_TD, w1_EDF, _b1, w2_EFD, b2_ED, weights_TK, order_A, token_A, expert_A, offsets_E1 = inputs
    _y, z_AF, a_AF, w1c, w2c = output
    saved_activations_only(ctx, z_AF, a_AF, w1c, w2c)
    ctx.param_dtype = w1_EDF.dtype  # the parameters' gradients come back in their own dtype
    ctx.save_for_backward(
        x_TD, _for_kernels(w1_EDF, w1c), _for_kernels(w2_EFD, w2c), b2_ED, z_AF, a_AF, weights_TK,
        order_A, token_A, expert_A, offsets_E1,
    )  # fmt: skip


def _backward_with(bwd):
    """The forward's backward, computing the gradients with ``bwd`` (the backward op, or its body)."""

    def backward(ctx, dy_TD, *_unused_intermediate_grads):
        if dy_TD is None:  # y took no part in the loss (grads are not materialised as zeros)
            return (None,) * 10  # one per input of triton_experts_fwd
        needs = list(ctx.needs_input_grad[:6])  # x, w1, b1, w2, b2, weights
        grads = bwd(dy_TD, *ctx.saved_tensors, ctx.param_dtype, needs)
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None

    return backward


triton_experts_fwd.register_autograd(_backward_with(triton_experts_bwd), setup_context=_setup_context)
_forward = op_or_eager(triton_experts_fwd, _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def is_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels run on ``device`` (CUDA, or any device with ``TRITON_INTERPRET=1``), and why not."""
    if INTERPRET:
        return True, ""
    if device.type != "cuda":
        return False, (
            f"Triton kernels need a CUDA device (got {device.type!r}); set TRITON_INTERPRET=1 before "
            "importing moe_emergence.kernels to run them (slowly) on the CPU"
        )
    return True, ""


def triton_experts(
    x_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    b1_EF: torch.Tensor,
    w2_EFD: torch.Tensor,
    b2_ED: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Experts function (see ``moe_emergence.experts``) on the Triton kernels (custom ops above)."""
    out_dtype = x_TD.dtype
    # the parameters are cast inside the op, which returns their gradients in their own dtype
    supported = is_supported(x_TD.device)
    x_TD, *params = backend_inputs("triton", supported, x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, cast_params=False)
    w1_EDF, b1_EF, w2_EFD, b2_ED = params
    if activation not in ACTIVATIONS:
        raise ValueError(f"triton experts support activations {ACTIVATIONS}, got {activation!r}")
    meta = triton_routing_meta(indices_TK, w1_EDF.shape[0], weights_TK)  # zero-weight assignments: dead rows
    y_TD = _forward(x_TD.contiguous(), w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, *meta.tensors())[0]
    return y_TD.to(out_dtype)
