"""Expert capacity: how many routing assignments each expert takes per forward, and what overflows.

Shapes (legend: docs/architecture.md): T tokens, E experts, K experts per token, C expert capacity,
R preference ranks (R = K for ``drop``, E for ``next_best``).

Pure functions, no host syncs (capacity is a Python int from static shapes).

Capacity per expert (Switch / GShard), T = all tokens in the forward::

    C = ceil(T * k / E * capacity_factor)

Priority (GShard): every token's rank-1 choice before any rank-2 choice, token order within a rank.
Padding tokens (``mask_T == 0``) take no capacity and are never dropped (their output is unused).

``drop``: an assignment past its expert's capacity gets weight 0 (with k = 1 the token passes through
the residual with zero MoE output). ``next_best``: ranks r = 0 .. E-1 are processed in turn; at rank r
every token that still has free slots proposes its r-th preferred expert, which accepts proposals in
token order while it has room. A token so gets its k highest-preferred experts that still had room
when it asked, never the same expert twice. An assignment is still dropped when every expert with room
is one the token already holds (or one excluded by expert dropout); for k = 1 with capacity_factor >= 1
(total capacity E * C >= T) nothing is dropped unless experts are excluded.

Dropped assignments are still computed by the expert backends, with weight 0: the semantics are exact,
the compute is not saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(T * k / E * capacity_factor)``, at most T (an expert never needs more than every token)."""
    return min(num_tokens, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def preference_order(selected_TK: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
    """``[T, R]`` with R = E: each token's experts in preference order: its k selected experts in slot order,
    then the others by decreasing ``scores_TE`` (ties by expert index)."""
    T, K = selected_TK.shape
    rank_TE = (-scores_TE).argsort(dim=-1, stable=True).argsort(dim=-1)  # rank of each expert
    slot_TK = torch.arange(K, device=scores_TE.device).expand(T, K) - K  # negative: before any rank
    rank_TE = rank_TE.scatter(1, selected_TK, slot_TK)
    return rank_TE.argsort(dim=-1)


def assign_with_capacity(
    pref_TR: torch.Tensor,
    valid_TR: torch.Tensor,
    top_k: int,
    capacity: int,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """``accepted_TR`` (bool): which of each token's first R preferences got a slot (module docstring).

    ``pref_TR``: experts in preference order; ``valid_TR``: whether that expert may be used at all
    (False for experts excluded by expert dropout). A token stops proposing once it holds ``top_k``.
    """
    T, R = pref_TR.shape
    real_T = torch.ones(T, dtype=torch.bool, device=pref_TR.device) if mask_T is None else mask_T.bool()
    used_E = torch.zeros(num_experts, dtype=torch.long, device=pref_TR.device)
    filled_T = torch.zeros(T, dtype=torch.long, device=pref_TR.device)
    accepted = []
    for r in range(R):
        e_T = pref_TR[:, r]
        propose_T = (filled_T < top_k) & valid_TR[:, r] & real_T
        onehot_TE = F.one_hot(e_T, num_experts) * propose_T[:, None]
        before_TE = onehot_TE.cumsum(0) - onehot_TE  # proposals to the same expert earlier in token order
        pos_T = (before_TE + used_E).gather(1, e_T[:, None]).squeeze(1)
        accept_T = propose_T & (pos_T < capacity)
        used_E = (used_E + onehot_TE.sum(0)).clamp_max(capacity)
        filled_T = filled_T + accept_T.long()
        accepted.append(accept_T)
    return torch.stack(accepted, dim=1) if accepted else torch.zeros(T, 0, dtype=torch.bool)


def compact_accepted(pref_TR: torch.Tensor, accepted_TR: torch.Tensor, top_k: int) -> tuple:
    """(indices_TK, filled_TK): the accepted experts in preference order, then unfilled slots.

    An unfilled slot holds the best non-accepted preference (never a duplicate of an accepted expert);
    ``filled_TK`` is False there.
    """
    R = pref_TR.shape[1]
    r_R = torch.arange(R, device=pref_TR.device)
    key_TR = torch.where(accepted_TR, r_R, r_R + R)
    order_TK = key_TR.argsort(dim=-1)[:, :top_k]
    return pref_TR.gather(1, order_TK), accepted_TR.gather(1, order_TK)
