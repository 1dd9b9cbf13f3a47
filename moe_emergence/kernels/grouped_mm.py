"""``grouped_mm`` backend: the expert MLPs as ``torch._grouped_mm`` calls over expert-sorted rows.

Shapes: T tokens, D model width, F intermediate width, E experts, K experts per token, A = T * K.
Rows ``*_A?`` are in the sorted order of ``routing_meta`` (expert e owns rows offsets[e]:offsets[e+1]).

Forward: gather x rows (x_AD), z_AF = x_AD @ w1[e] (+ b1[e] added in place by ``addmm_`` with a
one-hot [A, E] matrix: no gathered [A, F] bias tensor), a_AF = act(z_AF), o_AD = a_AF @ w2[e] + b2[e],
then each row is scaled by its routing weight (float32) and written to its assignment slot; the K
slots of a token are summed in float32 (no atomics, deterministic).
Backward is explicit (the grouped GEMMs of dX and dW, bias gradients as one-hot GEMMs summed in
float32 by the GEMM), so it does not depend on autograd support of ``_grouped_mm``.
``torch._grouped_mm`` needs 16-byte aligned strides: D and F times the element size must be
multiples of 16; other shapes raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moe_emergence.kernels.autocast import autocast_off, cast_for_autocast, check_dtypes
from moe_emergence.kernels.routing_meta import RoutingMeta, routing_meta

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


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
    with torch.enable_grad():
        zz = z.detach().requires_grad_()
        (dz,) = torch.autograd.grad(ACT2FN[activation](zz), zz, da)
    return dz


def _combine(rows_AD: torch.Tensor, meta: RoutingMeta, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's K sorted rows: write rows to their assignment slot, sum over K in float32."""
    slots_AD = torch.empty_like(rows_AD).index_copy_(0, meta.order_A, rows_AD)
    if meta.top_k == 1:
        return slots_AD.to(dtype)
    return slots_AD.view(T, meta.top_k, -1).sum(1, dtype=torch.float32).to(dtype)


class _GroupedMMExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, meta: RoutingMeta, activation: str):
        T = x_TD.shape[0]
        E = w1_EDF.shape[0]
        offs_E = meta.offsets_E1[1:].to(torch.int32)
        onehot_AE = F.one_hot(meta.expert_A, E).to(x_TD.dtype)
        x_AD = x_TD.index_select(0, meta.token_A)
        z_AF = torch._grouped_mm(x_AD, w1_EDF, offs=offs_E).addmm_(onehot_AE, b1_EF)
        a_AF = _act(z_AF, activation)
        o_AD = torch._grouped_mm(a_AF, w2_EFD, offs=offs_E).addmm_(onehot_AE, b2_ED)
        w_A = weights_TK.reshape(-1).index_select(0, meta.order_A).float()
        y_TD = _combine(o_AD.float() * w_A[:, None], meta, T, x_TD.dtype)
        ctx.save_for_backward(x_AD, w1_EDF, w2_EFD, z_AF, a_AF, o_AD, w_A, onehot_AE, offs_E)
        ctx.meta, ctx.activation, ctx.T = meta, activation, T
        ctx.weights_dtype = weights_TK.dtype
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_AD, w1_EDF, w2_EFD, z_AF, a_AF, o_AD, w_A, onehot_AE, offs_E = ctx.saved_tensors
        meta: RoutingMeta = ctx.meta
        dy_AD = dy_TD.index_select(0, meta.token_A)
        dw_A = (dy_AD.float() * o_AD.float()).sum(-1)
        dweights_TK = torch.empty_like(dw_A).index_copy_(0, meta.order_A, dw_A)
        dweights_TK = dweights_TK.view(ctx.T, meta.top_k).to(ctx.weights_dtype)
        do_AD = (dy_AD.float() * w_A[:, None]).to(a_AF.dtype)
        dw2_EFD = torch._grouped_mm(a_AF.t(), do_AD, offs=offs_E)
        db2_ED = (onehot_AE.t() @ do_AD).to(w2_EFD.dtype)
        da_AF = torch._grouped_mm(do_AD, w2_EFD.transpose(1, 2), offs=offs_E)
        dz_AF = _act_backward(da_AF, z_AF, ctx.activation)
        dw1_EDF = torch._grouped_mm(x_AD.t(), dz_AF, offs=offs_E)
        db1_EF = onehot_AE.t() @ dz_AF
        dx_AD = torch._grouped_mm(dz_AF, w1_EDF.transpose(1, 2), offs=offs_E)
        dx_TD = _combine(dx_AD, meta, ctx.T, dx_AD.dtype)
        return dx_TD, dw1_EDF, db1_EF, dw2_EFD, db2_ED, dweights_TK, None, None


# torch.compile runs this function eagerly (a graph break): traced through by dynamo, the Triton
# Function gave zero weight gradients (torch 2.11, seen on the H100); see docs/benchmarks.md
@torch.compiler.disable
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
    ok, why = is_supported(x_TD.device)
    if not ok:
        raise RuntimeError(f"grouped_mm experts cannot run: {why}")
    dev = x_TD.device.type
    out_dtype = x_TD.dtype
    x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED = cast_for_autocast(dev, x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED)
    dtype = check_dtypes("grouped_mm", x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED)
    D, F_ = w1_EDF.shape[1:]
    if (D * x_TD.element_size()) % 16 or (F_ * x_TD.element_size()) % 16:
        raise ValueError(
            f"grouped_mm experts need D and F such that D*{x_TD.element_size()} and F*{x_TD.element_size()} "
            f"bytes are multiples of 16 ({dtype}); got D={D}, F={F_}: use backend 'eager' or 'triton'"
        )
    meta = routing_meta(indices_TK, w1_EDF.shape[0])
    with autocast_off(dev):
        y_TD = _GroupedMMExperts.apply(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, weights_TK, meta, activation)
    return y_TD.to(out_dtype)
