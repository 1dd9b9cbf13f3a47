"""``grouped_mm`` backend: the expert MLPs as ``torch._grouped_mm`` calls over expert-sorted rows.

Shapes (legend: docs/architecture.md): T tokens, D model width, F expert intermediate width, E experts,
K experts per token, A = T * K assignments.
Rows ``*_A?`` are in the sorted order of ``routing_meta`` (expert e owns rows offsets[e]:offsets[e+1]).
Zero-weight assignments are the dead rows ``offsets[E]:A`` (``routing_meta`` docstring): past the last group
of every ``_grouped_mm``, so no GEMM reads them and the GEMM outputs' dead rows are never written
(uninitialised memory); every pass over all A rows (the combine, d(weights)) masks them to 0 with a ``where``.

Forward: gather x rows (x_AD), z_AF = x_AD @ w1[e] + b1[e] (the bias rows gathered per row and added in
place: a one-hot GEMM would add 0 * b1[e'] of every other expert, NaN where one is inf), a_AF = act(z_AF),
o_AD = a_AF @ w2[e] + b2[e], then each row is scaled by its routing weight (float32) and written to its
assignment slot; the K slots of a token are summed in float32 (no atomics, deterministic).
Backward is explicit (the grouped GEMMs of dX and dW, bias gradients as grouped GEMMs of a ones row block
with each expert's rows, summed in float32 by the GEMM), so it does not depend on autograd support of
``_grouped_mm``.
Forward and backward are ``torch.library`` custom ops (``moe_emergence::grouped_mm_experts_fwd`` -> ``(y,
x_AD, z_AF, a_AF, o_AD, w_A)``, ``..._bwd`` -> the six gradients), tied by ``register_autograd``,
so ``torch.compile`` keeps them in its graph; eagerly, the same bodies run under a plain ``autograd.Function``.
The routing metadata is computed outside and passed as its four tensors; both ops run with autocast off (inputs
cast before, ``kernels/op_common.py``).
``torch._grouped_mm`` needs 16-byte aligned strides: D and F times the element size must be
multiples of 16; other shapes raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moe_emergence.kernels.op_common import (
    autocast_off,
    backend_inputs,
    op_or_eager,
    saved_activations_only,
)
from moe_emergence.kernels.routing_meta import RoutingMeta, routing_meta

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
Tensor = torch.Tensor


def fits(d_model: int, d_ff: int, element_size: int = 2) -> bool:
    """Whether rows of D and of F elements are 16-byte aligned, as ``torch._grouped_mm`` needs; the default
    element size (2: bf16 / fp16, the strictest dtype the backend takes) answers for every dtype."""
    return (d_model * element_size) % 16 == 0 and (d_ff * element_size) % 16 == 0


def is_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this backend runs on ``device``, and why not."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    return True, ""


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in TANH_GELUS:
        return F.gelu(z, approximate="tanh")
    return ACT2FN[activation](z)


def _act_backward(da: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in TANH_GELUS:
        return torch.ops.aten.gelu_backward(da, z, approximate="tanh")
    _, vjp = torch.func.vjp(ACT2FN[activation], z)  # autograd is off inside a custom op; torch.func works
    return vjp(da)[0]


def _live_rows(meta: RoutingMeta) -> Tensor:
    """``[A, 1]`` bool: the sorted row belongs to an expert (not a dead, zero-weight row)."""
    return (meta.expert_A < meta.num_experts)[:, None]


def _combine(rows_AD: Tensor, meta: RoutingMeta, T: int, dtype: torch.dtype) -> Tensor:
    """Sum each token's K sorted rows: write rows to their assignment slot (dead rows as zeros: their rows were
    never computed), sum over K in float32."""
    rows_AD = torch.where(_live_rows(meta), rows_AD, 0.0)
    slots_AD = torch.empty_like(rows_AD).index_copy_(0, meta.order_A, rows_AD)
    if meta.top_k == 1:
        return slots_AD.to(dtype)
    return slots_AD.view(T, meta.top_k, -1).sum(1, dtype=torch.float32).to(dtype)


def _bias_rows(b_EO: Tensor, meta: RoutingMeta) -> Tensor:
    """``[A, O]`` each sorted row's expert bias (dead rows: the last expert's, never used)."""
    return b_EO.index_select(0, meta.expert_A.long().clamp_max(meta.num_experts - 1))


def _bias_grad(g_AO: Tensor, offs_E: Tensor) -> Tensor:
    """``[E, O]`` the column sums of each expert's rows of ``g_AO``: one grouped GEMM of a ones block
    (8 rows, column-major: 16-byte aligned) with them; dead rows lie past the last group and are not read."""
    ones_MA = torch.ones(g_AO.shape[0], 8, device=g_AO.device, dtype=g_AO.dtype).t()
    return torch._grouped_mm(ones_MA, g_AO, offs=offs_E)[:, 0].contiguous()


def _fwd_impl(
    x_TD: Tensor, w1_EDF: Tensor, b1_EF: Tensor, w2_EFD: Tensor, b2_ED: Tensor, weights_TK: Tensor,
    order_A: Tensor, token_A: Tensor, expert_A: Tensor, offsets_E1: Tensor, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    meta = RoutingMeta(order_A, token_A, expert_A, offsets_E1, w1_EDF.shape[0], weights_TK.shape[1])
    T = x_TD.shape[0]
    with autocast_off(x_TD.device.type):
        offs_E = offsets_E1[1:].to(torch.int32)
        x_AD = x_TD.index_select(0, token_A)
        z_AF = torch._grouped_mm(x_AD, w1_EDF, offs=offs_E).add_(_bias_rows(b1_EF, meta))
        a_AF = _act(z_AF, activation)
        o_AD = torch._grouped_mm(a_AF, w2_EFD, offs=offs_E).add_(_bias_rows(b2_ED, meta))
        w_A = weights_TK.reshape(-1).index_select(0, order_A).float()
        y_TD = _combine(o_AD.float() * w_A[:, None], meta, T, x_TD.dtype)
    return y_TD, x_AD, z_AF, a_AF, o_AD, w_A


grouped_mm_experts_fwd = torch.library.custom_op("moe_emergence::grouped_mm_experts_fwd", mutates_args=())(
    _fwd_impl
)


@grouped_mm_experts_fwd.register_fake
def _(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, order_A, token_A, expert_A, offsets_E1, activation):
    (T, D), F_, A = x_TD.shape, w1_EDF.shape[2], order_A.shape[0]
    new = x_TD.new_empty
    return new(T, D), new(A, D), new(A, F_), new(A, F_), new(A, D), new(A, dtype=torch.float32)


def _bwd_impl(
    dy_TD: Tensor, x_AD: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, z_AF: Tensor, a_AF: Tensor, o_AD: Tensor,
    w_A: Tensor, weights_TK: Tensor, order_A: Tensor, token_A: Tensor, expert_A: Tensor, offsets_E1: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    meta = RoutingMeta(order_A, token_A, expert_A, offsets_E1, w1_EDF.shape[0], weights_TK.shape[1])
    T = weights_TK.shape[0]
    with autocast_off(dy_TD.device.type):
        offs_E = offsets_E1[1:].to(torch.int32)
        dy_AD = dy_TD.index_select(0, token_A)
        dw_A = torch.where(_live_rows(meta)[:, 0], (dy_AD.float() * o_AD.float()).sum(-1), 0.0)
        dweights_TK = torch.empty_like(dw_A).index_copy_(0, order_A, dw_A)
        dweights_TK = dweights_TK.view(T, meta.top_k).to(weights_TK.dtype)
        do_AD = (dy_AD.float() * w_A[:, None]).to(a_AF.dtype)
        dw2_EFD = torch._grouped_mm(a_AF.t(), do_AD, offs=offs_E)
        db2_ED = _bias_grad(do_AD, offs_E).to(w2_EFD.dtype)
        da_AF = torch._grouped_mm(do_AD, w2_EFD.transpose(1, 2), offs=offs_E)
        dz_AF = _act_backward(da_AF, z_AF, activation)
        dw1_EDF = torch._grouped_mm(x_AD.t(), dz_AF, offs=offs_E)
        db1_EF = _bias_grad(dz_AF, offs_E)
        dx_AD = torch._grouped_mm(dz_AF, w1_EDF.transpose(1, 2), offs=offs_E)
        dx_TD = _combine(dx_AD, meta, T, dx_AD.dtype)
    return dx_TD, dw1_EDF, db1_EF, dw2_EFD, db2_ED, dweights_TK


grouped_mm_experts_bwd = torch.library.custom_op("moe_emergence::grouped_mm_experts_bwd", mutates_args=())(
    _bwd_impl
)


@grouped_mm_experts_bwd.register_fake
def _(dy_TD, x_AD, w1_EDF, w2_EFD, z_AF, a_AF, o_AD, w_A, weights_TK, order_A, token_A, expert_A,
      offsets_E1, activation):  # fmt: skip
    (E, D, F_), new = w1_EDF.shape, x_AD.new_empty
    return (
        new(weights_TK.shape[0], D), new(E, D, F_), new(E, F_), new(E, F_, D), new(E, D),
        torch.empty_like(weights_TK),
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    _x, w1_EDF, _b1, w2_EFD, _b2, weights_TK, order_A, token_A, expert_A, offsets_E1, activation = inputs
    _y, x_AD, z_AF, a_AF, o_AD, w_A = output
    saved_activations_only(ctx, x_AD, z_AF, a_AF, o_AD, w_A)
    ctx.save_for_backward(
        x_AD,
        w1_EDF,
        w2_EFD,
        z_AF,
        a_AF,
        o_AD,
        w_A,
        weights_TK,
        order_A,
        token_A,
        expert_A,
        offsets_E1,
    )
    ctx.activation = activation


def _backward_with(bwd):
    """The forward's backward, computing the gradients with ``bwd`` (the backward op, or its body)."""

    def backward(ctx, dy_TD, *_unused_intermediate_grads):
        if dy_TD is None:  # y took no part in the loss (grads are not materialised as zeros)
            return (None,) * 11  # one per input of grouped_mm_experts_fwd
        grads = bwd(dy_TD, *ctx.saved_tensors, ctx.activation)
        return *grads, None, None, None, None, None

    return backward


grouped_mm_experts_fwd.register_autograd(_backward_with(grouped_mm_experts_bwd), setup_context=_setup_context)
_forward = op_or_eager(grouped_mm_experts_fwd, _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def grouped_mm_experts(
    x_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    b1_EF: torch.Tensor,
    w2_EFD: torch.Tensor,
    b2_ED: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Experts function (see ``moe_emergence.experts``) on ``torch._grouped_mm``."""
    out_dtype = x_TD.dtype
    x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED = backend_inputs(
        "grouped_mm", is_supported(x_TD.device), x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED
    )
    D, F_ = w1_EDF.shape[1:]
    if not fits(D, F_, x_TD.element_size()):
        raise ValueError(
            f"grouped_mm experts need D and F such that D*{x_TD.element_size()} and F*{x_TD.element_size()} "
            f"bytes are multiples of 16 ({x_TD.dtype}); got D={D}, F={F_}: use backend 'eager' or 'triton'"
        )
    meta = routing_meta(indices_TK, w1_EDF.shape[0], weights_TK)  # zero-weight assignments: dead rows
    y_TD = _forward(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, *meta.tensors(), activation)[0]
    return y_TD.to(out_dtype)
