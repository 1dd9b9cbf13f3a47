"""Selection perturbations and expert-choice selection: pure functions used by ``routing.Router``.

Shapes (legend: docs/architecture.md): T tokens, E experts, K experts per token, C expert capacity
(expert choice: the slots of each expert).

Random draws use the global torch RNG on the tensors' device (so gradient checkpointing, which preserves
the RNG state, replays them); no host syncs.
"""

from __future__ import annotations

import torch


def expert_dropout_keep(
    num_experts: int, top_k: int, p: float, device: torch.device, allowed_E: torch.Tensor | None = None
) -> torch.Tensor:
    """``keep_E`` (bool) for one forward: expert e is dropped when its draw ``u_e ~ U(0, 1)`` is < p,
    except that the k experts with the highest draws always survive (so every token keeps k choices).
    ``allowed_E`` (bool, e.g. an ablation's expert mask): only those can be kept, the k survivors among
    them (the draws are the same with or without it)."""
    u_E = torch.rand(num_experts, device=device)
    if allowed_E is None:
        return (u_E >= p).scatter(0, u_E.topk(top_k).indices, True)
    u_E = u_E.masked_fill(~allowed_E, -1.0)
    return ((u_E >= p) & allowed_E).scatter(0, u_E.topk(top_k).indices, True)


def random_reroute(indices_TK: torch.Tensor, p: float, allowed_E: torch.Tensor) -> torch.Tensor:
    """With probability p per token, replace its slot-0 (top-1) expert by one drawn uniformly from the
    allowed experts (``allowed_E`` bool ``[E]``); if the drawn expert already sits in another slot, the
    two slots swap, so a token never holds an expert twice."""
    T = indices_TK.shape[0]
    E = allowed_E.shape[0]
    device = indices_TK.device
    flip_T = torch.rand(T, device=device) < p
    draws_TE = torch.rand(T, E, device=device).masked_fill(~allowed_E, -1.0)
    new_T = draws_TE.argmax(dim=-1)  # uniform over the allowed experts
    old_T = indices_TK[:, 0]
    top_T = torch.where(flip_T, new_T, old_T)
    rest_TK = indices_TK[:, 1:]
    clash_TK = flip_T[:, None] & (rest_TK == new_T[:, None])
    rest_TK = torch.where(clash_TK, old_T[:, None], rest_TK)
    return torch.cat([top_T[:, None], rest_TK], dim=1)


def expert_choice(
    probs_TE: torch.Tensor,
    capacity: int,
    mask_T: torch.Tensor | None = None,
    expert_mask_E: torch.Tensor | None = None,
    real_capacity: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", sec. 3.1):
    each expert takes the tokens with the highest probability for it.

    ``capacity``: C, the static number of slots per expert (``C = ceil(T * k / E * capacity_factor)`` over
    all T tokens, so shapes stay static). ``real_capacity``: how many of them an expert takes, from the
    real tokens (``capacity.expert_capacity(mask_T.sum(), ...)``, an int or a 0-d tensor; None = C).
    Each expert ranks the real tokens by probability, ties by token index (a stable sort, so the ranking
    of real tokens never depends on padding), padding after every real token; its slots hold the first C
    of that ranking and it takes the first ``real_capacity`` of them.

    Returns ``tokens_EC`` (int64 token indices), ``weights_EC`` (that token's probability for the expert,
    with gradient, where taken; 0 elsewhere), ``taken_EC`` (bool: the slot is an assignment: rank below
    ``real_capacity``, a real token, an expert not removed) and ``unrouted_T`` (bool: no expert took the
    token, padding included; its MoE output is zero). ``expert_mask_E`` (bool, False = removed): a
    removed expert takes nothing.
    """
    T, E = probs_TE.shape
    scores_ET = probs_TE.detach().t()
    if mask_T is not None:
        scores_ET = scores_ET.masked_fill(~mask_T.bool()[None, :], -1.0)  # probabilities are >= 0
    tokens_EC = scores_ET.sort(dim=-1, descending=True, stable=True).indices[:, :capacity]
    taken_EC = torch.ones(E, capacity, dtype=torch.bool, device=probs_TE.device)
    if real_capacity is not None:
        taken_EC = taken_EC & (torch.arange(capacity, device=probs_TE.device) < real_capacity)[None, :]
    if mask_T is not None:
        taken_EC = taken_EC & mask_T.bool()[tokens_EC]
    if expert_mask_E is not None:
        taken_EC = taken_EC & expert_mask_E[:, None]
    weights_EC = probs_TE.t().gather(1, tokens_EC) * taken_EC.to(probs_TE.dtype)
    taken_T = torch.zeros(T, dtype=torch.long, device=probs_TE.device)
    taken_T = taken_T.index_add_(0, tokens_EC.reshape(-1), taken_EC.reshape(-1).long())
    return tokens_EC, weights_EC, taken_EC, taken_T == 0
