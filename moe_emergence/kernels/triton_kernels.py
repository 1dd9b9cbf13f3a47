"""The Triton kernels of the ``triton`` backend and their launchers (``triton_experts`` registers the ops).

Shapes: T tokens, D model width, F intermediate width, E experts, K experts per token, A = T * K.
Rows ``*_A?`` are in the expert-sorted order of ``routing_meta`` (expert e owns rows
offsets[e]:offsets[e+1]); token-order tensors are ``*_T?``.

Kernels:
  ``_rows_kernel``  out[row'] = epilogue(in[row] @ W[e]) for the sorted rows of every expert. The input
                    rows may be gathered (``in_idx``: token rows read inside the GEMM, no padded copy of X)
                    and the output rows scattered (``out_idx``: written in token/assignment order).
                    Epilogues: + bias; GELU-tanh forward (storing the pre-activation too); scale by the
                    routing weight (storing the unscaled rows too); GELU-tanh backward (times gelu'(z)).
  ``_wgrad_kernel`` dW[e] = X[rows_e]^T @ G[rows_e]; X rows may be gathered.
  ``_colsum_kernel`` db[e] = sum_r G[r] over expert e's rows, in float32, over S slices of each expert's rows
                    (the bias gradient: summed in the GEMM loop it pulled G through registers and made dW
                    ~1.5x slower on the H100).
  ``_bwd_prep_kernel`` for each sorted row r: dO[r] = w[r] * dy[token[r]] and d(weight)[slot r] =
                    <dy[token[r]], o[r]> in float32 (the backward's row-wise work in one pass).
Tile sizes are autotuned for Hopper; under ``TRITON_INTERPRET=1`` one small fixed config is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moe_emergence.kernels.routing_meta import RoutingMeta

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# MOE_TRITON_AUTOTUNE=0: one fixed config on the GPU too (tests: many small shapes, no tuning time)
AUTOTUNE = os.environ.get("MOE_TRITON_AUTOTUNE", "1") != "0"

EPI_NONE, EPI_GELU, EPI_GELU_BWD = 0, 1, 2


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        shapes = [(16, 16, 16, 1, 1)]
    elif not AUTOTUNE:
        shapes = [(64, 64, 32, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


ROWS_CONFIGS = _configs(
    [
        (128, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 256, 64, 8, 3),
    ]
)
WGRAD_CONFIGS = _configs(
    [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 256, 32, 8, 4),
        (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
)


@triton.jit
def _tanh(u, APPROX: tl.constexpr):
    if APPROX:  # one MUFU instruction, max relative error ~2^-11: below bf16/fp16 rounding of the result
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1
        )
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.autotune(configs=ROWS_CONFIGS, key=["N", "K", "E", "EPILOGUE", "GATHER", "SCATTER", "HAS_BIAS"])
@triton.jit
def _rows_kernel(
    in_ptr, w_ptr, bias_ptr, out_ptr, aux_ptr, scale_ptr, in_idx_ptr, out_idx_ptr, offsets_ptr,
    N, K, E,
    s_in_m, s_in_k, s_we, s_wk, s_wn, s_be, s_out_m, s_aux_m,
    EPILOGUE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE: tl.constexpr, E_POW2: tl.constexpr, PRECISION: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    # which expert owns row block pid_m: blocks are laid out expert after expert
    e_idx = tl.arange(0, E_POW2)
    start_E = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
    end_E = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
    nblk_E = (end_E - start_E + BLOCK_M - 1) // BLOCK_M
    cum_E = tl.cumsum(nblk_E, 0)
    if pid_m >= tl.sum(nblk_E, 0):
        return
    e = tl.sum((cum_E <= pid_m).to(tl.int32), 0)
    sel = e_idx == e
    first_blk = tl.sum(tl.where(sel, cum_E - nblk_E, 0), 0)
    row0 = tl.sum(tl.where(sel, start_E, 0), 0) + (pid_m - first_blk) * BLOCK_M
    row_end = tl.sum(tl.where(sel, end_E, 0), 0)

    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    in_rows = tl.load(in_idx_ptr + rows, mask=row_mask, other=0) if GATHER else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    rk = tl.arange(0, BLOCK_K)
    in_ptrs = in_ptr + in_rows[:, None].to(tl.int64) * s_in_m + rk[None, :] * s_in_k
    w_ptrs = w_ptr + e.to(tl.int64) * s_we + rk[:, None] * s_wk + cols[None, :] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = rk < K - k * BLOCK_K
        a = tl.load(in_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        in_ptrs += BLOCK_K * s_in_k
        w_ptrs += BLOCK_K * s_wk

    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * s_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    aux_ptrs = aux_ptr + rows[:, None].to(tl.int64) * s_aux_m + cols[None, :]
    if SCALE:  # store the unscaled rows (sorted order) in aux, then scale by the routing weight
        tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c = 0.7978845608028654  # sqrt(2 / pi)
    if EPILOGUE == 1:  # GELU-tanh; aux <- pre-activation z
        tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = 0.5 * acc * (1.0 + _tanh(c * (acc + 0.044715 * acc * acc * acc), APPROX_TANH))
    if EPILOGUE == 2:  # times gelu'(z), z read from aux
        z = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(c * (z + 0.044715 * z * z * z), APPROX_TANH)
        acc *= 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
    out_rows = tl.load(out_idx_ptr + rows, mask=row_mask, other=0) if SCATTER else rows
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * s_out_m + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=WGRAD_CONFIGS, key=["M", "N", "E", "GATHER"])
@triton.jit
def _wgrad_kernel(
    x_ptr, g_ptr, dw_ptr, x_idx_ptr, offsets_ptr,
    M, N, E,
    s_x_m, s_g_m, s_dw_e, s_dw_m,
    GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    e = pid // (num_m * num_n)
    pid_m = (pid // num_n) % num_m
    pid_n = pid % num_n
    row0 = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(row0, row_end, BLOCK_K):
        rows = r + rk
        rmask = rows < row_end
        x_rows = tl.load(x_idx_ptr + rows, mask=rmask, other=0) if GATHER else rows
        x = tl.load(  # [BLOCK_K rows, BLOCK_M cols]: coalesced along the columns, transposed for the dot
            x_ptr + x_rows[:, None].to(tl.int64) * s_x_m + cm[None, :],
            mask=rmask[:, None] & (cm[None, :] < M),
            other=0.0,
        )
        g = tl.load(
            g_ptr + rows[:, None].to(tl.int64) * s_g_m + cn[None, :],
            mask=rmask[:, None] & (cn[None, :] < N),
            other=0.0,
        )
        acc = tl.dot(tl.trans(x), g, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * s_dw_e + cm[:, None] * s_dw_m + cn[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(cm[:, None] < M) & (cn[None, :] < N))


@triton.jit
def _colsum_kernel(
    g_ptr, part_ptr, offsets_ptr, N, E, s_g_m, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """part[s, e] = float32 sum of G's rows in the s-th of S equal slices of expert e's rows (S = grid axis 2:
    a hot expert's rows are summed by S programs); the bias gradient is part.sum(0)."""
    e, pid_n, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    per_slice = tl.cdiv(row_end - row0, tl.num_programs(2))
    start = row0 + s * per_slice
    stop = tl.minimum(start + per_slice, row_end)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in range(start, stop, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        g = tl.load(
            g_ptr + rows[:, None].to(tl.int64) * s_g_m + cn[None, :],
            mask=(rows[:, None] < stop) & (cn[None, :] < N),
            other=0.0,
        )
        acc += tl.sum(g.to(tl.float32), 0)
    tl.store(part_ptr + (s * E + e) * N + cn, acc, mask=cn < N)


@triton.jit
def _bwd_prep_kernel(
    dy_ptr, o_ptr, w_ptr, do_ptr, dwts_ptr, token_ptr, order_ptr, A, D, s_dy_m, s_dy_d, s_o_m, s_do_m,
    WANT_DWTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < A
    tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
    dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols[None, :] < D)
        dy = tl.load(dy_ptr + tok[:, None] * s_dy_m + cols[None, :] * s_dy_d, mask=mask, other=0.0).to(
            tl.float32
        )
        tl.store(
            do_ptr + rows[:, None].to(tl.int64) * s_do_m + cols[None, :],
            (dy * w[:, None]).to(do_ptr.dtype.element_ty),
            mask=mask,
        )
        if WANT_DWTS:
            o = tl.load(o_ptr + rows[:, None].to(tl.int64) * s_o_m + cols[None, :], mask=mask, other=0.0)
            dots += tl.sum(dy * o.to(tl.float32), 1)
    if WANT_DWTS:
        slots = tl.load(order_ptr + rows, mask=rmask, other=0)
        tl.store(dwts_ptr + slots, dots, mask=rmask)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not (INTERPRET or torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def launch_rows(
    inp, w_EKN, out, meta: RoutingMeta, *, bias=None, aux=None, scale=None, gather=False, scatter=False,
    epilogue=EPI_NONE,
):  # fmt: skip
    """out[out rows] = epilogue(inp[in rows] @ w_EKN[e]); ``w_EKN`` may be a transposed view."""
    A, E = meta.order_A.numel(), meta.num_experts
    K, N = w_EKN.shape[1:]
    aux = out if aux is None else aux
    bias = out if bias is None else bias

    def grid(meta_):
        return ((triton.cdiv(A, meta_["BLOCK_M"]) + E) * triton.cdiv(N, meta_["BLOCK_N"]),)

    _rows_kernel[grid](
        inp, w_EKN, bias, out, aux, out if scale is None else scale,
        meta.token_A if gather else meta.order_A, meta.order_A, meta.offsets_E1,
        N, K, E,
        inp.stride(0), inp.stride(1), *w_EKN.stride(), bias.stride(0), out.stride(0), aux.stride(0),
        EPILOGUE=epilogue, GATHER=gather, SCATTER=scatter, HAS_BIAS=bias is not out,
        SCALE=scale is not None, E_POW2=max(16, triton.next_power_of_2(E)), PRECISION=_precision(inp.dtype),
        APPROX_TANH=not INTERPRET and out.element_size() == 2,  # 16-bit outputs: exact tanh would be rounded away
    )  # fmt: skip


def launch_wgrad(x, g, meta: RoutingMeta, *, gather: bool, want_w: bool = True, want_bias: bool):
    """(dW [E, x cols, g cols] or None, db [E, g cols] or None) summed over each expert's sorted rows."""
    E, M, N = meta.num_experts, x.shape[1], g.shape[1]
    dw = db = None
    if want_bias:  # S slices per expert, summed in a fixed order: deterministic
        S, block_n = (2, 16) if INTERPRET else (8, 64)
        part = torch.empty(S, E, N, device=x.device, dtype=torch.float32)
        _colsum_kernel[(E, triton.cdiv(N, block_n), S)](
            g, part, meta.offsets_E1, N, E, g.stride(0), BLOCK_R=16 if INTERPRET else 64, BLOCK_N=block_n
        )
        db = part.sum(0).to(x.dtype)
    if not want_w:
        return dw, db
    dw = torch.empty(E, M, N, device=x.device, dtype=x.dtype)

    def grid(meta_):
        return (E * triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)

    _wgrad_kernel[grid](
        x, g, dw, meta.token_A, meta.offsets_E1, M, N, E, x.stride(0), g.stride(0), dw.stride(0), dw.stride(1),
        GATHER=gather, PRECISION=_precision(x.dtype),
    )  # fmt: skip
    return dw, db


def launch_bwd_prep(dy_TD, o_AD, w_A, meta: RoutingMeta, *, want_dweights: bool):
    """(dO_AD = w * dy[token] in dy's dtype, d(weights) [A] float32 in assignment order or None)."""
    A, D = o_AD.shape
    do_AD = torch.empty(A, D, device=dy_TD.device, dtype=dy_TD.dtype)
    dwts_A = torch.empty(A, device=dy_TD.device, dtype=torch.float32) if want_dweights else w_A
    block_r = 16 if INTERPRET else 32
    _bwd_prep_kernel[(triton.cdiv(A, block_r),)](
        dy_TD, o_AD, w_A, do_AD, dwts_A, meta.token_A, meta.order_A, A, D,
        *dy_TD.stride(), o_AD.stride(0), do_AD.stride(0),  # dy may be any view (autograd can pass expanded grads)
        WANT_DWTS=want_dweights, BLOCK_R=block_r, BLOCK_D=16 if INTERPRET else 128,
    )  # fmt: skip
    return do_AD, (dwts_A if want_dweights else None)


def to_tokens(rows_fn, meta: RoutingMeta, T: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """Run ``rows_fn(out)`` writing each sorted row to its assignment slot; sum the K slots (float32)."""
    if meta.top_k == 1:
        out = torch.empty(T, D, device=like.device, dtype=like.dtype)
        rows_fn(out)
        return out
    slots = torch.empty(T * meta.top_k, D, device=like.device, dtype=torch.float32)
    rows_fn(slots)
    return slots.view(T, meta.top_k, D).sum(1).to(like.dtype)
