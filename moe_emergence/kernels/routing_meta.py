"""Routing metadata: the T*K (token, expert) assignments sorted by expert, without host syncs.

Shapes (legend: docs/architecture.md): T tokens, K experts per token, A = T * K assignments, E experts.
An assignment ``a = t * K + k`` sends token ``t`` to expert ``indices_TK[t, k]``. Sorting the A
assignments by expert (stably) gives "sorted order": position ``r`` holds assignment ``order_A[r]``,
whose token is ``token_A[r]`` and expert ``expert_A[r]``. Expert ``e`` owns the sorted rows
``offsets_E1[e] : offsets_E1[e + 1]`` (possibly empty).

Zero-weight assignments (``weights_TK`` given): an assignment whose combine weight is exactly 0 gets the
sentinel expert id E before the sort, so it sorts after every expert's rows, into ``offsets_E1[E] : A``, the
"dead" rows, which belong to no expert: no backend computes them, and the combine writes zeros (not their
rows) to their slots (``moe_emergence.experts``: such an assignment adds nothing to y and gets no gradient).
Without ``weights_TK`` every assignment is live and ``offsets_E1[E] == A``.

Everything is computed on the device with one sort and a ``searchsorted`` of the sorted ids (a
histogram by bisection); no ``.item()``, ``.tolist()``, ``nonzero`` or other host synchronisation.
The ids are sorted as 16-bit integers (32-bit past 32767 experts): a radix sort then takes 2 passes
over the keys instead of the 8 that int64 keys cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingMeta(NamedTuple):
    """Sorted-order view of the assignments (int64 except ``expert_A``, see below)."""

    order_A: torch.Tensor  # [A] assignment id t*K+k at sorted position r
    token_A: torch.Tensor  # [A] token id at sorted position r
    expert_A: torch.Tensor  # [A] expert id at sorted position r (non-decreasing; int16 / int32, see above)
    # [E+1] start of each expert's rows; offsets_E1[E] = start of the dead rows (<= A)
    offsets_E1: torch.Tensor
    num_experts: int
    top_k: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order_A, token_A, expert_A, offsets_E1)``: how the backends' custom ops take the metadata
        (ops accept tensors, ints and strings, not this tuple); rebuild it with ``RoutingMeta(*tensors, E, K)``."""
        return self.order_A, self.token_A, self.expert_A, self.offsets_E1


def expert_id_dtype(num_experts: int) -> torch.dtype:
    """The dtype of ``expert_A``: int16 (the sort key, see above), int32 past 32767 experts."""
    return torch.int16 if num_experts < torch.iinfo(torch.int16).max else torch.int32


def check_weights_shape(indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
    """``ValueError`` unless the combine weights have the indices' shape ``[T, K]``."""
    if weights_TK.shape != indices_TK.shape:
        raise ValueError(
            f"weights_TK has shape {tuple(weights_TK.shape)}, indices_TK {tuple(indices_TK.shape)}"
        )


def live_expert_ids(
    indices_TK: torch.Tensor, weights_TK: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """``[A]`` the expert id of each assignment, the sentinel ``num_experts`` where its weight is exactly 0 (in
    ``expert_id_dtype``; E itself fits: int16 is used below 32767 experts)."""
    flat_A = indices_TK.reshape(-1).to(expert_id_dtype(num_experts))
    if weights_TK is None:
        return flat_A
    check_weights_shape(indices_TK, weights_TK)
    return flat_A.masked_fill(weights_TK.reshape(-1) == 0, num_experts)


def routing_meta(
    indices_TK: torch.Tensor, num_experts: int, weights_TK: torch.Tensor | None = None
) -> RoutingMeta:
    """Sort the assignments of ``indices_TK`` [T, K] (expert ids in [0, E)) by expert; with ``weights_TK`` the
    zero-weight ones last, as dead rows (module docstring)."""
    if indices_TK.dim() != 2:
        raise ValueError(f"indices_TK must be [T, K], got shape {tuple(indices_TK.shape)}")
    K = indices_TK.shape[1]
    flat_A = live_expert_ids(indices_TK, weights_TK, num_experts)
    expert_A, order_A = torch.sort(flat_A, stable=True)
    bounds_E1 = torch.arange(num_experts + 1, device=flat_A.device, dtype=expert_A.dtype)
    offsets_E1 = torch.searchsorted(expert_A, bounds_E1)
    return RoutingMeta(
        order_A=order_A,
        token_A=order_A // K,
        expert_A=expert_A,
        offsets_E1=offsets_E1,
        num_experts=num_experts,
        top_k=K,
    )
