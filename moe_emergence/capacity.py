"""Expert capacity: how many routing assignments each expert takes per forward, and what overflows.

Shapes (legend: docs/architecture.md): T tokens, E experts, K experts per token, C expert capacity,
R preference ranks (R = K for ``drop``, E for ``next_best``).

Pure functions, no host syncs.

Capacity per expert (Fedus et al. 2021, "Switch Transformers", eq. 3; Lepikhin et al. 2020, "GShard",
sec. 2.2), from the real tokens of the forward only (``mask_T == 1``; all T when there is no mask)::

    C = min(T_real, ceil(T_real * k / E * capacity_factor))

so a batch routes its real tokens the same however much padding it carries and wherever it sits. With
no mask C is a Python int from the static shape; with a mask it is a 0-d int64 tensor on the mask's
device, computed in float64 with the same operations as the Python formula (no host sync).

Priority (GShard): every token's rank-1 choice before any rank-2 choice, token order within a rank.
Padding tokens (``mask_T == 0``) take no capacity and are never dropped (their output is unused); as
padding neither counts towards C nor moves the real tokens' relative order, which real assignments are
kept does not depend on padding.

``drop``: an assignment past its expert's capacity gets weight 0 (with k = 1 the token passes through
the residual with zero MoE output). ``next_best``: ranks r = 0 .. E-1 are processed in turn; at rank r
every token that still has free slots proposes its r-th preferred expert, which accepts proposals in
token order while it has room. A token so gets its k highest-preferred experts that still had room
when it asked, never the same expert twice. An assignment is still dropped when every expert with room
is one the token already holds (or one excluded by expert dropout); for k = 1 with capacity_factor >= 1
(total capacity E * C >= T_real) nothing is dropped unless experts are excluded.

Dropped assignments have weight 0, and the expert backends do not compute weight-0 assignments
(``experts.ExpertBank``): a dropped token never touches the expert that dropped it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_capacity(
    num_tokens: int | torch.Tensor, top_k: int, num_experts: int, capacity_factor: float
) -> int | torch.Tensor:
    """``C = min(T, ceil(T * k / E * capacity_factor))`` (Switch Transformers eq. 3; an expert never needs
    more than every token), T = ``num_tokens``, the real tokens of the forward.

    A Python int gives a Python int. A 0-d integer tensor (e.g. ``mask_T.sum()``) gives a 0-d int64 tensor
    on its device with no host sync: float64 with the operations of the Python formula in its order
    (``(T * k) / E``, then ``* capacity_factor``, then ceil), so it equals the int for every T.
    """
    if not isinstance(num_tokens, torch.Tensor):
        return min(num_tokens, math.ceil(num_tokens * top_k / num_experts * capacity_factor))
    tokens = num_tokens.long()
    assignments_f64 = (tokens * top_k).double()  # exact: an integer below 2**53
    # E as a tensor, not a Python scalar: CUDA divides a tensor by a scalar (eager and Inductor alike) by
    # multiplying with the scalar's reciprocal, which is an ulp off IEEE division (and Python) for E that
    # are not powers of two, enough to move the ceil (seen on an H200: 665 of 144,000 grid points off).
    experts_f64 = assignments_f64 * 0.0 + num_experts
    capacity = torch.ceil(assignments_f64 / experts_f64 * capacity_factor).long()
    return torch.minimum(capacity, tokens)


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
    capacity: int | torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """``accepted_TR`` (bool): which of each token's first R preferences got a slot (module docstring).

    ``pref_TR``: experts in preference order; ``valid_TR``: whether that expert may be used at all
    (False for experts excluded by expert dropout). A token stops proposing once it holds ``top_k``.
    ``capacity``: C per expert, an int or a 0-d tensor (``expert_capacity``); ``mask_T``: 1 = real token,
    padding never proposes.
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
