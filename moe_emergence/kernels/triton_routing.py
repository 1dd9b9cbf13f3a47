"""The ``triton`` backend's routing metadata: ``routing_meta``'s sorted order by a stable counting sort in two
Triton kernels, instead of torch's radix sort, ``searchsorted`` and index arithmetic (~8 small kernels).

Shapes (legend: docs/architecture.md): T tokens, K experts per token, A = T * K assignments
(``a = t * K + k``), E experts, G chunks of BLOCK consecutive assignments.
  ``_count_kernel``  counts[g, e] = how many assignments of chunk g go to expert e.
  ``_place_kernel``  the sorted position of assignment a (expert e, chunk g) = offsets[e] + (assignments to e
                     in chunks before g) + (assignments to e before a in chunk g): assignments keep their order
                     within an expert, as ``torch.sort(stable=True)`` keeps it. Writes order, token and expert
                     at that position; chunk 0 also writes offsets.
An assignment whose weight is exactly 0 counts as the sentinel expert E (``routing_meta.live_expert_ids``):
it is placed after every expert's rows, among the dead rows ``offsets[E]:A``.
The result is ``RoutingMeta``, identical to ``routing_meta.routing_meta`` (the torch reference the tests
compare with); no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_emergence.kernels.routing_meta import RoutingMeta, check_weights_shape, expert_id_dtype, routing_meta
from moe_emergence.kernels.triton_launch import Launcher, triton_op

_TILE = 16384  # entries of a chunk's one-hot tile [BLOCK, E_POW2]


@triton.jit
def _expert_ids(idx_ptr, w_ptr, a, in_range, E):
    """The expert id of assignments ``a``: E (dead) where the weight is exactly 0, -1 past A."""
    ids = tl.load(idx_ptr + a, mask=in_range, other=-1)
    w = tl.load(w_ptr + a, mask=in_range, other=1.0)
    return tl.where(w == 0, E, ids)


@triton.jit
def _count_kernel(idx_ptr, w_ptr, counts_ptr, A, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    g = tl.program_id(0)
    a = g * BLOCK + tl.arange(0, BLOCK)
    ids = _expert_ids(idx_ptr, w_ptr, a, a < A, E)
    e_idx = tl.arange(0, E_POW2)
    onehot = (ids[:, None] == e_idx[None, :]).to(tl.int32)
    tl.store(counts_ptr + g * E_POW2 + e_idx, tl.sum(onehot, 0))


@triton.jit
def _place_kernel(
    idx_ptr, w_ptr, counts_ptr, order_ptr, token_ptr, expert_ptr, offsets_ptr, A, E, G, K,
    BLOCK: tl.constexpr, E_POW2: tl.constexpr, G_POW2: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    e_idx = tl.arange(0, E_POW2)
    chunks = tl.arange(0, G_POW2)
    counts = tl.load(
        counts_ptr + chunks[:, None] * E_POW2 + e_idx[None, :], mask=chunks[:, None] < G, other=0
    )  # [G_POW2, E_POW2]
    total_E = tl.sum(counts, 0)
    offsets_E = tl.cumsum(total_E, 0) - total_E  # exclusive: each expert's first row (at E: the dead rows')
    base_E = offsets_E + tl.sum(tl.where(chunks[:, None] < g, counts, 0), 0)
    a = g * BLOCK + tl.arange(0, BLOCK)
    in_range = a < A
    ids = _expert_ids(idx_ptr, w_ptr, a, in_range, E)
    onehot = (ids[:, None] == e_idx[None, :]).to(tl.int32)  # [BLOCK, E_POW2]
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # same-expert assignments before a in this chunk
    pos = tl.sum(onehot * base_E[None, :], 1) + rank
    tl.store(order_ptr + pos, a.to(tl.int64), mask=in_range)
    tl.store(token_ptr + pos, (a // K).to(tl.int64), mask=in_range)
    tl.store(expert_ptr + pos, ids, mask=in_range)
    if g == 0:
        tl.store(offsets_ptr + e_idx, offsets_E.to(tl.int64), mask=e_idx <= E)


_COUNT, _PLACE = Launcher(_count_kernel), Launcher(_place_kernel)

# assignments per chunk (program): small chunks keep the in-chunk scan short. H100, A = 8192, E = 8, both kernels:
# 5.2 us with 128, 8.2 with 512, 19.0 with 1024 (2026-11-23, docs/benchmarks.md)
_MAX_BLOCK = 128


def _layout(A: int, E: int) -> tuple[int, int, int] | None:
    """(E_POW2, BLOCK, chunks) of the kernels for A assignments to E experts, or None where their tiles would
    not fit: the one-hot [BLOCK, E_POW2] and the count table [chunks, E_POW2] of at most 16384 / 65536 entries."""
    e_pow2 = triton.next_power_of_2(E + 1)  # room for the dead rows' column E and offsets[E]
    fitting = triton.next_power_of_2(
        triton.cdiv(A * e_pow2, 4 * _TILE)
    )  # smallest chunk whose count table fits
    block = max(16, min(max(_MAX_BLOCK, fitting), _TILE // e_pow2))
    chunks = max(1, triton.cdiv(A, block))
    if block * e_pow2 > _TILE or chunks * e_pow2 > 4 * _TILE:
        return None
    return e_pow2, block, chunks


def _routing(
    indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = indices_TK.shape
    A, E, device = T * K, num_experts, indices_TK.device
    layout = _layout(A, E)
    if layout is None:
        return routing_meta(indices_TK, E, weights_TK).tensors()
    e_pow2, block, chunks = layout
    flat_A, weights_A = indices_TK.reshape(-1), weights_TK.reshape(-1)
    counts = torch.empty(chunks, e_pow2, device=device, dtype=torch.int32)
    order_A = torch.empty(A, device=device, dtype=torch.int64)
    token_A = torch.empty_like(order_A)
    expert_A = torch.empty(A, device=device, dtype=expert_id_dtype(E))
    offsets_E1 = torch.empty(E + 1, device=device, dtype=torch.int64)
    _COUNT((chunks,), flat_A, weights_A, counts, A, E, BLOCK=block, E_POW2=e_pow2)
    _PLACE(
        (chunks,), flat_A, weights_A, counts, order_A, token_A, expert_A, offsets_E1, A, E, chunks, K,
        BLOCK=block, E_POW2=e_pow2, G_POW2=triton.next_power_of_2(chunks),
    )  # fmt: skip
    return order_A, token_A, expert_A, offsets_E1


def _routing_fake(indices_TK, weights_TK, num_experts):
    A = indices_TK.numel()
    order_A = indices_TK.new_empty(A, dtype=torch.int64)
    return (
        order_A,
        torch.empty_like(order_A),
        indices_TK.new_empty(A, dtype=expert_id_dtype(num_experts)),
        (indices_TK.new_empty(num_experts + 1, dtype=torch.int64)),
    )


KERNELS = (_count_kernel, _place_kernel)  # for triton_launch.triton_op
# an op like the expert ops (``triton_launch.triton_op``: traced into by torch.compile on the GPU, opaque where
# Inductor replays CUDA graphs)
_routing_op = triton_op("moe_emergence::triton_routing", _routing, list(KERNELS), _routing_fake)


def triton_routing_meta(
    indices_TK: torch.Tensor, num_experts: int, weights_TK: torch.Tensor | None = None
) -> RoutingMeta:
    """``routing_meta(indices_TK, num_experts, weights_TK)`` by the two kernels above; where their tiles would not
    fit (past ~1000 experts, or past A = 4M assignments with E = 8, 65536 with E = 64) by ``routing_meta`` itself
    (the same result). ``weights_TK`` None: every assignment is live."""
    if indices_TK.dim() != 2:
        raise ValueError(f"indices_TK must be [T, K], got shape {tuple(indices_TK.shape)}")
    if weights_TK is None:
        weights_TK = torch.ones(indices_TK.shape, device=indices_TK.device)
    check_weights_shape(indices_TK, weights_TK)
    run = _routing_op if torch.compiler.is_compiling() else _routing
    return RoutingMeta(*run(indices_TK, weights_TK.detach(), num_experts), num_experts, indices_TK.shape[1])
