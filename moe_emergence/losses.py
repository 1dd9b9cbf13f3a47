"""Router auxiliary losses, one formula each, computed in float32.

Shapes: T tokens, E experts, K experts per token. ``mask_T`` is 1 for real tokens and 0 for padding;
masked tokens never count. A batch with no real token gives 0 (not NaN).

How the model combines layers: ``GPT2MoEForCausalLM`` reports the MEAN of each loss over its MoE
layers, and ``loss = lm_loss + lb_coef * aux_loss + z_coef * z_loss``.
"""

from __future__ import annotations

import torch


def _token_weights(num_tokens: int, mask_T: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if mask_T is None:
        return torch.ones(num_tokens, device=device, dtype=torch.float32)
    if mask_T.shape != (num_tokens,):
        raise ValueError(f"mask has shape {tuple(mask_T.shape)}, expected ({num_tokens},)")
    return mask_T.to(device=device, dtype=torch.float32)


def expert_counts(
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
    assignment_mask_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of routing assignments per expert, float32 ``[E]`` (each token contributes k).

    ``assignment_mask_TK`` (optional, bool or 0/1) counts only some assignments, e.g.
    ``~RouterOutput.dropped`` to leave out those past capacity.
    """
    T, K = topk_indices_TK.shape
    w_T = _token_weights(T, mask_T, topk_indices_TK.device)
    w_A = w_T.repeat_interleave(K)
    if assignment_mask_TK is not None:
        if assignment_mask_TK.shape != (T, K):
            raise ValueError(
                f"assignment mask has shape {tuple(assignment_mask_TK.shape)}, expected ({T}, {K})"
            )
        w_A = w_A * assignment_mask_TK.reshape(-1).to(w_A)
    counts_E = torch.zeros(num_experts, device=topk_indices_TK.device, dtype=torch.float32)
    return counts_E.index_add_(0, topk_indices_TK.reshape(-1), w_A)


def masked_mean(values_T: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values_T`` over the real tokens (float32 scalar; 0 when there are none).

    Used for the entropy loss (``RouterOutput.entropy``) and for telemetry fractions, e.g.
    ``masked_mean(dropped.float().mean(-1), mask)`` = dropped_frac and ``masked_mean(unrouted.float(),
    mask)`` = unrouted_frac.
    """
    w_T = _token_weights(values_T.shape[0], mask_T, values_T.device)
    v_T = torch.where(w_T > 0, values_T.float(), torch.zeros_like(values_T, dtype=torch.float32))
    return (v_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def expert_fractions(
    topk_indices_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """f_i: fraction of routing assignments that go to expert i, ``[E]``, sums to 1 (0 if no tokens)."""
    counts_E = expert_counts(topk_indices_TK, num_experts, mask_T)
    return counts_E / counts_E.sum().clamp_min(1.0)


def mean_router_probs(router_probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """P_i: mean router probability of expert i over the (unmasked) tokens, ``[E]``."""
    T = router_probs_TE.shape[0]
    w_T = _token_weights(T, mask_T, router_probs_TE.device)
    return (router_probs_TE.float() * w_T[:, None]).sum(0) / w_T.sum().clamp_min(1.0)


def load_balance_loss(
    router_probs_TE: torch.Tensor,
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
    fractions_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balance loss ``E * sum_i f_i * P_i`` (scalar, float32).

    f_i = fraction of the T*k routing assignments sent to expert i (no gradient: it comes from argmax),
    P_i = mean over tokens of the router probability of expert i (carries the gradient).
    Uniform routing gives 1; every token sent to one expert with probability 1 gives E.

    ``fractions_E`` overrides f (used for global balancing, where f is computed over the whole
    data-parallel batch by the trainer).
    """
    if fractions_E is None:
        fractions_E = expert_fractions(topk_indices_TK, num_experts, mask_T)
    P_E = mean_router_probs(router_probs_TE, mask_T)
    return num_experts * (fractions_E.detach().float() * P_E).sum()


def z_loss(router_logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE) ``mean_t logsumexp(logits_t)^2`` (scalar, float32).

    Zero logits give (ln E)^2.
    """
    T = router_logits_TE.shape[0]
    w_T = _token_weights(T, mask_T, router_logits_TE.device)
    z_T = torch.logsumexp(router_logits_TE.float(), dim=-1) ** 2
    z_T = torch.where(w_T > 0, z_T, torch.zeros_like(z_T))  # padding never counts, even if non-finite
    return (z_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def aux_losses_per_layer(
    router_outputs: dict, mask_T: torch.Tensor, num_experts: int, global_counts_fn=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balance ``[L]``, z ``[L]``), one value per MoE layer in ``router_outputs`` order
    (``{block: RouterOutput}``); the model reports their means, the trainer also checks each layer.
    ``global_counts_fn(counts_LE) -> summed counts_LE`` (an all-reduce) makes f_i global across
    processes; None keeps it per micro-batch."""
    layers = list(router_outputs.values())
    fractions_LE = [None] * len(layers)
    if global_counts_fn is not None:
        counts_LE = torch.stack([expert_counts(r.topk_indices, num_experts, mask_T) for r in layers])
        counts_LE = global_counts_fn(counts_LE)
        fractions_LE = list(counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1.0))
    lb = [
        load_balance_loss(r.router_probs, r.topk_indices, num_experts, mask_T, fractions_E=f)
        for r, f in zip(layers, fractions_LE, strict=True)
    ]
    z = [z_loss(r.router_logits, mask_T) for r in layers]
    return torch.stack(lb), torch.stack(z)
