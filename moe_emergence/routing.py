"""Token-choice top-k router with annealed logit noise and a straight-through estimator for top-1,
plus the routing variants for ablations (capacity, selection bias, random routing, expert dropout,
expert choice), all off by default.

Shapes (legend: docs/architecture.md): B rows, S positions, T = B * S tokens, D model width, E experts,
K experts per token, C expert capacity (expert choice), R preference ranks (capacity).
Inputs may be ``[T, D]`` or ``[B, S, D]`` (flattened to T = B * S). All routing maths runs in float32,
whatever the activation dtype or autocast state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_emergence.capacity import assign_with_capacity, compact_accepted, expert_capacity, preference_order
from moe_emergence.selection import expert_choice, expert_dropout_keep, random_reroute
from moe_emergence.token_mask import as_token_mask


@dataclass
class RouterOutput:
    """What one router forward produced (all float32 except the indices).

    topk_weights: ``[T, K]`` combine weights of the selected experts.
    topk_indices: ``[T, K]`` selected experts (int64), ordered by decreasing probability (by decreasing
        biased score with a selection bias; in preference order of the final choice after random
        routing or ``next_best`` overflow).
    router_probs: ``[T, E]`` softmax of the (noisy, in training) logits; the load-balance loss uses it.
    router_probs_clean: ``[T, E]`` softmax of the logits before noise.
    router_logits: ``[T, E]`` raw gate logits, before noise (the z-loss uses them).
    entropy: ``[T]`` entropy of the clean probabilities, natural log.

    Variant fields (None when the variant is off):
    dropped: ``[T, K]`` bool, the assignment overflowed its expert's capacity and has weight 0
        (``capacity_factor`` set; capacity ``C = min(T_real, ceil(T_real * k / E * capacity_factor))``
        from the real tokens, Switch Transformers eq. 3; padding is never dropped).
    ec_tokens, ec_weights: ``[E, C]`` expert-choice slots (Zhou et al. 2022): the tokens each expert
        ranked first and their combine weights, 0 where the slot is not taken. C is static, from all T
        tokens (``ceil(T * k / E * (capacity_factor or 1))``); an expert takes only its first
        ``min(T_real, ceil(T_real * k / E * (capacity_factor or 1)))`` slots, real tokens only.
        With expert choice, ``topk_indices`` / ``topk_weights`` are only the token's own top-k
        preference (used by the load-balance loss and telemetry), not what was computed.
    ec_taken: ``[E, C]`` bool, expert choice: the slot is an assignment that was computed with its
        weight (rank below the real-token capacity, a real token, an expert not removed).
    unrouted: ``[T]`` bool, expert choice: no expert took the token (its MoE output is zero; True for
        padding).
    """

    topk_weights: torch.Tensor
    topk_indices: torch.Tensor
    router_probs: torch.Tensor
    router_probs_clean: torch.Tensor
    router_logits: torch.Tensor
    entropy: torch.Tensor
    dropped: torch.Tensor | None = None
    ec_tokens: torch.Tensor | None = None
    ec_weights: torch.Tensor | None = None
    unrouted: torch.Tensor | None = None
    ec_taken: torch.Tensor | None = None


def entropy_from_probs(probs_TE: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_e p_e ln p_e per row (0 ln 0 = 0), ``[T]``."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1)


class Router(nn.Module):
    """Linear gate (no bias) -> optional noise -> softmax over all experts -> top-k.

    Noise: ``logits + N(0, sigma(step)^2)`` in training mode only, with
    ``sigma(step) = noise_std * max(0, 1 - step / noise_anneal_steps)`` (constant ``noise_std`` when
    ``noise_anneal_steps == 0``). ``step`` is a buffer (in the state dict) set by the trainer with
    ``set_step`` once per optimizer step; forward calls never advance it.

    Weights: k > 1 with ``normalize_topk``: ``w = p_topk / sum(p_topk)``. k = 1 with
    ``straight_through`` in training: ``w = (p_sel - stopgrad(p_sel)) + 1`` (exactly 1.0 forward,
    d w / d p_sel = 1 backward); in eval plain 1.0. Otherwise ``w = p_topk``.
    Selection and weights use the noisy probabilities in training, the clean ones in eval.

    Variants (``MoEConfig`` fields, all off by default; off = exactly the computation above):
      - selection bias (``bias_update_rate > 0``): experts are ranked by ``noisy_logits + b`` (buffer
        ``selection_bias [E]``, in the state dict) but weighted by the unbiased probabilities;
        ``update_selection_bias(tokens_per_expert_E)`` does ``b += rate * sign(mean(tokens_per_expert) - tokens_per_expert_e)``.
      - expert dropout (training): experts outside ``keep_E`` (``selection.expert_dropout_keep``) cannot
        be selected and the weights use ``p_e * keep_e / sum_j p_j keep_j``.
      - random routing (training): ``selection.random_reroute`` on the selected indices; weights are
        then computed from the probabilities of the final choice (indices are no longer sorted).
      - capacity (``capacity_factor``): ``capacity`` module, capacity
        ``C = min(T_real, ceil(T_real * k / E * capacity_factor))`` per expert (Switch Transformers
        eq. 3, GShard); ``drop`` zeroes overflowed weights, ``next_best`` re-assigns them and recomputes
        the weights of the final choice.
      - expert choice (Zhou et al. 2022): ``selection.expert_choice`` over the (noisy in training)
        probabilities, ``[E, C]`` slots with ``C = ceil(T * k / E * (capacity_factor or 1))`` (static,
        all T tokens), of which each expert takes the first
        ``min(T_real, ceil(T_real * k / E * (capacity_factor or 1)))``; fills ``ec_tokens`` /
        ``ec_weights`` / ``ec_taken``.
    ``mask_T`` (``[T]``, 1 = real token; or a ``[B, S]`` mask, ``token_mask.as_token_mask``) keeps padding
    from taking capacity or being chosen by experts; capacities count the real tokens only
    (``T_real = mask_T.sum()``, all T without a mask), so the real tokens route the same whatever padding
    the batch carries, wherever it sits.

    ``expert_mask_E`` (bool ``[E]``, False = removed; for ablations) removes experts from this forward
    through the same path as expert dropout: a removed expert is never selected, the weights use
    ``p_e * keep_e / sum_j p_j keep_j``, and with expert choice a removed expert takes no token (its
    column gets weight 0). All True computes what no mask computes. Raises ``ValueError`` for a mask of
    the wrong shape or one that leaves fewer than K experts.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        noise_std: float = 0.0,
        noise_anneal_steps: int = 0,
        straight_through: bool = True,
        normalize_topk: bool = True,
        *,
        routing: str = "token_choice",
        capacity_factor: float | None = None,
        overflow: str = "drop",
        bias_update_rate: float = 0.0,
        random_routing_prob: float = 0.0,
        expert_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"Router top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = float(noise_std)
        self.noise_anneal_steps = int(noise_anneal_steps)
        self.straight_through = straight_through
        self.normalize_topk = normalize_topk
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model, dtype=torch.float32))  # [E, D]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if routing not in ("token_choice", "expert_choice"):
            raise ValueError(f"Router routing={routing!r} must be 'token_choice' or 'expert_choice'")
        if overflow not in ("drop", "next_best"):
            raise ValueError(f"Router overflow={overflow!r} must be 'drop' or 'next_best'")
        if capacity_factor is not None and not capacity_factor >= 1.0:
            raise ValueError(f"Router capacity_factor={capacity_factor!r} must be None or >= 1.0")
        if not 0.0 <= random_routing_prob <= 1.0:
            raise ValueError(f"Router random_routing_prob={random_routing_prob!r} must be in [0, 1]")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"Router expert_dropout={expert_dropout!r} must be in [0, 1)")
        if not bias_update_rate >= 0:
            raise ValueError(f"Router bias_update_rate={bias_update_rate!r} must be >= 0")
        self.routing = routing
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.overflow = overflow
        self.bias_update_rate = float(bias_update_rate)
        self.random_routing_prob = float(random_routing_prob)
        self.expert_dropout = float(expert_dropout)
        if self.bias_update_rate > 0:  # only then, so default checkpoints keep their keys
            self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))

    def extra_repr(self) -> str:
        s = (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"noise_std={self.noise_std}, noise_anneal_steps={self.noise_anneal_steps}, "
            f"straight_through={self.straight_through}, normalize_topk={self.normalize_topk}"
        )
        if self.routing != "token_choice":
            s += f", routing={self.routing}"
        if self.capacity_factor is not None:
            s += f", capacity_factor={self.capacity_factor}, overflow={self.overflow}"
        for name in ("bias_update_rate", "random_routing_prob", "expert_dropout"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)}"
        return s

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.0) -> None:
        """Gate init N(0, std^2); std 0 gives zeros (uniform routing)."""
        if std > 0:
            nn.init.normal_(self.weight, std=std)
        else:
            nn.init.zeros_(self.weight)

    def set_step(self, step: int) -> None:
        """Set the optimizer step that drives noise annealing (called by the trainer)."""
        self.step.fill_(int(step))

    def noise_std_now(self) -> torch.Tensor:
        """Noise std at the current step, a 0-d float32 tensor on the router's device (no host sync)."""
        if self.noise_anneal_steps == 0:
            return torch.full((), self.noise_std, device=self.step.device)
        remaining = (1.0 - self.step.float() / self.noise_anneal_steps).clamp_min(0.0)
        return self.noise_std * remaining

    @torch.no_grad()
    def update_selection_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step: ``b_e += bias_update_rate * sign(mean(tokens_per_expert) - tokens_per_expert_e)``.

        ``tokens_per_expert_E``: the step's assignment counts per expert (e.g. ``losses.routed_tokens_per_expert`` summed over
        the step's micro-batches). Call once per optimizer step.
        """
        if self.bias_update_rate == 0:
            raise ValueError("update_selection_bias: this router has bias_update_rate=0 (no selection bias)")
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"update_selection_bias: tokens_per_expert_E has shape {tuple(tokens_per_expert_E.shape)}, expected ({self.num_experts},)"
            )
        tokens_per_expert_E = tokens_per_expert_E.to(device=self.selection_bias.device, dtype=torch.float32)
        self.selection_bias += self.bias_update_rate * torch.sign(
            tokens_per_expert_E.mean() - tokens_per_expert_E
        )

    def combine_weights(self, topk_probs_TK: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Combine weights of the selected probabilities ``[T, K]``: straight-through 1.0 for top-1 (gradient
        of p in training), ``p / sum(p_topk)`` with ``normalize_topk``, else ``p``."""
        if self.top_k == 1 and self.straight_through:
            if self.training:
                return (topk_probs_TK - topk_probs_TK.detach()) + 1.0  # exactly 1.0 forward
            return torch.ones_like(topk_probs_TK)
        if self.normalize_topk:
            total_T1 = topk_probs_TK.sum(dim=-1, keepdim=True)
            return topk_probs_TK / (total_T1 if eps is None else total_T1.clamp_min(eps))
        return topk_probs_TK

    def _perturbs_selection(self, expert_mask_E: torch.Tensor | None) -> bool:
        return (
            self.bias_update_rate > 0
            or expert_mask_E is not None
            or (self.training and (self.random_routing_prob > 0 or self.expert_dropout > 0))
        )

    def _check_expert_mask(self, expert_mask_E: torch.Tensor | None) -> None:
        if expert_mask_E is None:
            return
        if expert_mask_E.shape != (self.num_experts,) or expert_mask_E.dtype != torch.bool:
            raise ValueError(
                f"Router expert_mask_E must be a bool tensor of shape ({self.num_experts},), got "
                f"{expert_mask_E.dtype} {tuple(expert_mask_E.shape)}"
            )
        if int(expert_mask_E.sum()) < self.top_k:
            raise ValueError(f"Router expert_mask_E leaves fewer than top_k={self.top_k} experts")

    def forward(
        self, x: torch.Tensor, mask_T: torch.Tensor | None = None, expert_mask_E: torch.Tensor | None = None
    ) -> RouterOutput:
        """Route ``x`` (``[T, D]`` or ``[B, S, D]``): a ``RouterOutput`` over its T tokens (class docstring).

        mask_T: 1/True = real token; ``[T]`` or ``[B, S]`` (``token_mask.as_token_mask``); None = all real.
        expert_mask_E: bool ``[E]``, False = expert removed (ablations); None = all experts.
        Raises ``ValueError`` for a mask of the wrong shape or one that leaves fewer than K experts."""
        x_TD = x.reshape(-1, x.shape[-1])
        mask_T = as_token_mask(mask_T, x_TD.shape[0], rows=x.shape[0] if x.dim() == 3 else None)
        self._check_expert_mask(expert_mask_E)
        extra = {}
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_clean_TE = logits_TE.softmax(dim=-1)
            noisy_logits_TE = logits_TE
            if self.training and self.noise_std > 0:
                noise_TE = self.noise_std_now() * torch.randn_like(logits_TE)
                noisy_logits_TE = logits_TE + noise_TE
                probs_TE = noisy_logits_TE.softmax(dim=-1)
            else:
                probs_TE = probs_clean_TE
            if self.routing == "token_choice" and self._perturbs_selection(expert_mask_E):
                weights_TK, topk_indices_TK, sel_TE, wprobs_TE, allowed_E = self._perturbed_topk(
                    noisy_logits_TE, probs_TE, expert_mask_E
                )
            else:
                topk_probs_TK, topk_indices_TK = probs_TE.topk(self.top_k, dim=-1)
                weights_TK = self.combine_weights(topk_probs_TK)
                sel_TE, wprobs_TE, allowed_E = probs_TE, probs_TE, None
            T = x_TD.shape[0]
            if self.routing == "expert_choice":
                cf = self.capacity_factor or 1.0
                C = expert_capacity(T, self.top_k, self.num_experts, cf)  # static slots
                real_capacity = (  # from the real tokens: a 0-d device tensor (no host sync)
                    None
                    if mask_T is None
                    else expert_capacity(mask_T.bool().sum(), self.top_k, self.num_experts, cf)
                )
                ec_probs_TE = probs_TE
                if expert_mask_E is not None:  # the survivors' probabilities, renormalised
                    ec_probs_TE = noisy_logits_TE.masked_fill(~expert_mask_E, -math.inf).softmax(dim=-1)
                tokens, weights, taken, unrouted = expert_choice(
                    ec_probs_TE, C, mask_T, expert_mask_E, real_capacity
                )
                extra = dict(ec_tokens=tokens, ec_weights=weights, ec_taken=taken, unrouted=unrouted)
            elif self.capacity_factor is not None:
                weights_TK, topk_indices_TK, dropped_TK = self._apply_capacity(
                    weights_TK, topk_indices_TK, sel_TE, wprobs_TE, allowed_E, mask_T
                )
                extra = dict(dropped=dropped_TK)
        return RouterOutput(
            topk_weights=weights_TK,
            topk_indices=topk_indices_TK,
            router_probs=probs_TE,
            router_probs_clean=probs_clean_TE,
            router_logits=logits_TE,
            entropy=entropy_from_probs(probs_clean_TE),
            **extra,
        )

    def _perturbed_topk(
        self, noisy_logits_TE: torch.Tensor, probs_TE: torch.Tensor, expert_mask_E: torch.Tensor | None
    ) -> tuple:
        """Selection with bias / expert dropout / removed experts / random routing: (weights, indices,
        selection scores, probabilities the weights use, allowed experts or None)."""
        E = self.num_experts
        sel_TE = noisy_logits_TE + self.selection_bias if self.bias_update_rate > 0 else probs_TE
        wprobs_TE, allowed_E = probs_TE, expert_mask_E
        if self.training and self.expert_dropout > 0:
            allowed_E = expert_dropout_keep(
                E, self.top_k, self.expert_dropout, probs_TE.device, expert_mask_E
            )
        if allowed_E is not None:
            sel_TE = sel_TE.masked_fill(~allowed_E, -math.inf)
            # = p * keep / sum(p * keep), computed stably (no 0/0 when the survivors' p underflow)
            wprobs_TE = noisy_logits_TE.masked_fill(~allowed_E, -math.inf).softmax(dim=-1)
        indices_TK = sel_TE.topk(self.top_k, dim=-1).indices
        if self.training and self.random_routing_prob > 0:
            allowed = (
                allowed_E if allowed_E is not None else torch.ones(E, dtype=torch.bool, device=sel_TE.device)
            )
            indices_TK = random_reroute(indices_TK, self.random_routing_prob, allowed)
        # eps: with a bias (or random routing) every selected p may underflow to 0 -> weights 0, not NaN
        weights_TK = self.combine_weights(wprobs_TE.gather(1, indices_TK), eps=1e-30)
        return weights_TK, indices_TK, sel_TE, wprobs_TE, allowed_E

    def _apply_capacity(self, weights_TK, indices_TK, sel_TE, wprobs_TE, allowed_E, mask_T) -> tuple:
        """(weights, indices, dropped) after capacity (``capacity`` module docstring)."""
        T, K = indices_TK.shape
        E = self.num_experts
        # from the real tokens: an int without a mask, a 0-d device tensor with one (no host sync)
        C = expert_capacity(T if mask_T is None else mask_T.bool().sum(), K, E, self.capacity_factor)
        real_T = (
            torch.ones(T, dtype=torch.bool, device=indices_TK.device) if mask_T is None else mask_T.bool()
        )
        if self.overflow == "drop":
            accepted_TK = assign_with_capacity(
                indices_TK, torch.ones_like(real_T)[:, None].expand(T, K), K, C, E, mask_T
            )
            dropped_TK = ~accepted_TK & real_T[:, None]
            return weights_TK.masked_fill(dropped_TK, 0.0), indices_TK, dropped_TK
        pref_TR = preference_order(indices_TK, sel_TE)
        valid_TR = torch.ones_like(pref_TR, dtype=torch.bool) if allowed_E is None else allowed_E[pref_TR]
        accepted_TR = assign_with_capacity(pref_TR, valid_TR, K, C, E, mask_T)
        new_TK, filled_TK = compact_accepted(pref_TR, accepted_TR, K)
        indices_TK = torch.where(real_T[:, None], new_TK, indices_TK)
        filled_TK = filled_TK | ~real_T[:, None]
        probs_TK = wprobs_TE.gather(1, indices_TK) * filled_TK
        weights_TK = self.combine_weights(probs_TK, eps=1e-30) * filled_TK
        return weights_TK, indices_TK, ~filled_TK
