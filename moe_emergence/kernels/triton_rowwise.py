"""The ``triton`` backend's row-wise Triton kernels, and the expert-block layout its GEMMs share.

Shapes (legend: docs/architecture.md): T tokens, D model width, E experts, K experts per token, A = T * K
assignments, O a GEMM's output width; rows ``*_A?`` in the expert-sorted order of ``routing_meta``
(expert e owns rows offsets[e]:offsets[e+1]).

  ``block_layout`` / ``block_at``  row blocks of BLOCK_M rows laid out expert after
                    expert: which expert and rows a block covers (no block mixes two experts' rows).
  ``_bwd_prep_kernel`` for each sorted row r: dO[r] = w[slot r] * dy[token[r]] and the bias term of
                    d(weight)[slot r], <dy[token[r]], b2[e]>, in float32 (the backward's row-wise work in one
                    pass; the rest, <dy, a W2>, comes from the dZ GEMM's epilogue: ``launch_rows``'s
                    row_dots), and the float32 column sums of dO per row block (db2 partials);
                    d(weight) = 0 for the dead rows offsets[E]:A (zero-weight assignments, not computed).
  ``_segsum_kernel`` db[e] = the sum of expert e's row-block partials, in a fixed order: the bias gradients
                    in float32 and deterministic, from values the kernels already held in registers.
  ``_sum_slots_kernel`` out[t] = the sum of token t's K slots (``to_tokens``, K > 1), in float32 and k order,
                    stored in out's dtype in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_emergence.kernels.routing_meta import RoutingMeta
from moe_emergence.kernels.triton_launch import INTERPRET, Launcher


@triton.jit
def block_layout(offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Per expert (padded to E_POW2): first row, end row, first row block, number of row blocks."""
    e_idx = tl.arange(0, E_POW2)
    start_E = tl.load(offsets_ptr + e_idx, mask=e_idx < E, other=0)
    end_E = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < E, other=0)
    nblk_E = (end_E - start_E + BLOCK_M - 1) // BLOCK_M
    return start_E, end_E, tl.cumsum(nblk_E, 0) - nblk_E, nblk_E


@triton.jit
def block_at(pid_m, start_E, end_E, first_E, nblk_E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row block ``pid_m`` of a ``block_layout``: (expert e, first row, end of e's rows)."""
    e = tl.sum((first_E + nblk_E <= pid_m).to(tl.int32), 0)
    sel = tl.arange(0, E_POW2) == e
    row0 = tl.sum(tl.where(sel, start_E, 0), 0) + (pid_m - tl.sum(tl.where(sel, first_E, 0), 0)) * BLOCK_M
    return e, row0, tl.sum(tl.where(sel, end_E, 0), 0)


@triton.jit
def _bwd_prep_kernel(
    dy_ptr, b2_ptr, w_ptr, do_ptr, dwts_ptr, part_ptr, token_ptr, order_ptr, offsets_ptr,
    D, E, A, s_dy_m, s_dy_d, s_b2_e, s_do_m,
    WANT_DWTS: tl.constexpr, COL_SUMS: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start_E, end_E, first_E, nblk_E = block_layout(offsets_ptr, E, BLOCK_R, E_POW2)
    live_blocks = tl.sum(nblk_E, 0)
    if pid >= live_blocks:  # past the experts' blocks: the dead rows' d(weight) is 0 (they were not computed)
        if WANT_DWTS:
            dead0 = tl.load(offsets_ptr + E)
            rows = dead0 + (pid - live_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = rows < A
            slots = tl.load(order_ptr + rows, mask=rmask, other=0)
            tl.store(dwts_ptr + slots, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=rmask)
        return
    e, row0, row_end = block_at(pid, start_E, end_E, first_E, nblk_E, BLOCK_R, E_POW2)
    rows = row0 + tl.arange(0, BLOCK_R)
    rmask = rows < row_end
    tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    slots = tl.load(order_ptr + rows, mask=rmask, other=0)
    w = tl.load(w_ptr + slots, mask=rmask, other=0.0).to(tl.float32)
    dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols[None, :] < D)
        dy = tl.load(dy_ptr + tok[:, None] * s_dy_m + cols[None, :] * s_dy_d, mask=mask, other=0.0).to(
            tl.float32
        )
        do = dy * w[:, None]
        tl.store(
            do_ptr + rows[:, None].to(tl.int64) * s_do_m + cols[None, :],
            do.to(do_ptr.dtype.element_ty),
            mask=mask,
        )
        if COL_SUMS:
            tl.store(part_ptr + pid.to(tl.int64) * D + cols, tl.sum(do, 0), mask=cols < D)
        if WANT_DWTS:  # the bias term of d(weight): <dy, b2[e]>
            b2 = tl.load(b2_ptr + e * s_b2_e + cols, mask=cols < D, other=0.0).to(tl.float32)
            dots += tl.sum(dy * b2[None, :], 1)
    if WANT_DWTS:
        tl.store(dwts_ptr + slots, dots, mask=rmask)


@triton.jit
def _segsum_kernel(
    part_ptr, out_ptr, offsets_ptr, N, E,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[e] = the sum of expert e's row-block partials (blocks of BLOCK_M rows, expert after expert), in
    float32 and in a fixed order (deterministic): BLOCK_B running sums, one per block position in a chunk, added
    elementwise chunk by chunk (no reduction inside the loop, so the chunks' loads overlap), reduced once."""
    e, pid_n = tl.program_id(0), tl.program_id(1)
    _start, _end, first_E, nblk_E = block_layout(offsets_ptr, E, BLOCK_M, E_POW2)
    sel = tl.arange(0, E_POW2) == e
    first = tl.sum(tl.where(sel, first_E, 0), 0)
    stop = first + tl.sum(tl.where(sel, nblk_E, 0), 0)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for b0 in range(first, stop, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (b[:, None] < stop) & (cn[None, :] < N)
        acc += tl.load(part_ptr + b[:, None].to(tl.int64) * N + cn[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + e * N + cn, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=cn < N)


@triton.jit
def _sum_slots_kernel(slots_ptr, out_ptr, T, D, K, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum over k of slots[t * K + k] for a [BLOCK_T, BLOCK_D] block: float32 sums in k order
    (deterministic), stored in out's dtype (one pass: no float32 [T, D] in between)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        ptrs = slots_ptr + (rows.to(tl.int64) * K + k)[:, None] * D + cols[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


_BWD_PREP, _SEGSUM, _SUM_SLOTS = (
    Launcher(_bwd_prep_kernel),
    Launcher(_segsum_kernel),
    Launcher(_sum_slots_kernel),
)
KERNELS = (_bwd_prep_kernel, _segsum_kernel, _sum_slots_kernel)  # for triton_launch.triton_op


def e_pow2(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def segment_sums(part: torch.Tensor, meta: RoutingMeta, block_m: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, O]`` per-expert sums of the row-block partials ``part`` ``[blocks, O]`` (blocks of ``block_m``
    rows; O the width of the summed rows)."""
    E, O_ = meta.num_experts, part.shape[1]
    out = torch.empty(E, O_, device=part.device, dtype=dtype)
    block_n = 16 if INTERPRET else 32
    _SEGSUM(
        (E, triton.cdiv(O_, block_n)), part, out, meta.offsets_E1, O_, E,
        BLOCK_M=block_m, E_POW2=e_pow2(E), BLOCK_B=16 if INTERPRET else 64, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def launch_bwd_prep(
    dy_TD, b2_ED, weights_TK, meta: RoutingMeta, *, want_dweights: bool, bias_grad: bool, grad_dtype=None,
):  # fmt: skip
    """(dO_AD = w * dy[token] in dy's dtype, <dy[token], b2[e]> [A] float32 in assignment order (the bias term
    of d(weights); 0 for the dead rows) or None,
    db2 [E, D] = per-expert column sums of dO (float32 sums, in ``grad_dtype``, default dy's) or None);
    w = the routing weight of each row's assignment."""
    A, D = meta.order_A.numel(), dy_TD.shape[1]
    b2_ED = b2_ED.contiguous()  # the kernel reads its rows with unit stride
    E = meta.num_experts
    weights_flat = weights_TK.contiguous().view(-1)  # assignment order: read at order[row] in the kernel
    do_AD = torch.empty(A, D, device=dy_TD.device, dtype=dy_TD.dtype)
    dwts_A = torch.empty(A, device=dy_TD.device, dtype=torch.float32) if want_dweights else weights_flat
    # 16 rows with one warp a block on the GPU: of 69 configs swept on the H200 at top-1, top-2 (E=8, T=8192) and
    # E=64 K=8 T=16384, the one nearest each shape's best (12.0 / 20.0 / 118.3 us against the best 12.0 / 19.8 /
    # 112.1, and 17 / 29 / 203 us for 32 rows with 4 warps; docs/benchmarks.md, 2026-12-03 14:33): many small
    # programs keep more row gathers in flight
    block_r = 16
    blocks = triton.cdiv(A, block_r) + E  # >= the experts' blocks plus the dead rows' (routing_meta)
    part = do_AD  # placeholder without bias_grad
    if bias_grad:  # one row of partial sums per row block
        part = torch.empty(blocks, D, device=dy_TD.device, dtype=torch.float32)
    _BWD_PREP(
        (blocks,), dy_TD, b2_ED, weights_flat, do_AD, dwts_A, part, meta.token_A, meta.order_A, meta.offsets_E1, D, E, A,
        *dy_TD.stride(), b2_ED.stride(0), do_AD.stride(0),  # dy may be any view (autograd can pass expanded grads)
        WANT_DWTS=want_dweights, COL_SUMS=bias_grad, E_POW2=e_pow2(E),
        BLOCK_R=block_r, BLOCK_D=16 if INTERPRET else 128, num_warps=1,
    )  # fmt: skip
    db = segment_sums(part, meta, block_r, grad_dtype or dy_TD.dtype) if bias_grad else None
    return do_AD, (dwts_A if want_dweights else None), db


def to_tokens(
    rows_fn, meta: RoutingMeta, T: int, D: int, like: torch.Tensor, slot_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Run ``rows_fn(out)`` writing each sorted row to its assignment slot ``[T * K, D]`` (in ``slot_dtype``);
    sum the K slots in float32 (a fixed order: deterministic) into ``like``'s dtype. ``slot_dtype=like.dtype``
    rounds each slot once more but halves the slots' memory for 16-bit ``like`` (the backward's dX: its
    ``[T * K, D]`` slots are the backward's peak at fine-grained shapes)."""
    if meta.top_k == 1:
        out = torch.empty(T, D, device=like.device, dtype=like.dtype)
        rows_fn(out)
        return out
    slots = torch.empty(T * meta.top_k, D, device=like.device, dtype=slot_dtype)
    rows_fn(slots)
    out = torch.empty(T, D, device=like.device, dtype=like.dtype)
    block_t, block_d = (16, 16) if INTERPRET else (16, 256)
    _SUM_SLOTS((triton.cdiv(T, block_t), triton.cdiv(D, block_d)), slots, out, T, D, meta.top_k,
               BLOCK_T=block_t, BLOCK_D=block_d)  # fmt: skip
    return out
