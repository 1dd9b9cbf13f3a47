"""Token-choice top-k router with annealed logit noise and a straight-through estimator for top-1.

Shapes: T tokens, D model width, E experts, K experts per token. Inputs may be ``[T, D]`` or
``[B, L, D]`` (flattened to T = B * L). All routing maths runs in float32, whatever the activation
dtype or autocast state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What one router forward produced (all float32 except the indices).

    topk_weights: ``[T, K]`` combine weights of the selected experts.
    topk_indices: ``[T, K]`` selected experts (int64), ordered by decreasing probability.
    router_probs: ``[T, E]`` softmax of the (noisy, in training) logits; the load-balance loss uses it.
    router_probs_clean: ``[T, E]`` softmax of the logits before noise.
    router_logits: ``[T, E]`` raw gate logits, before noise (the z-loss uses them).
    entropy: ``[T]`` entropy of the clean probabilities, natural log.
    """

    topk_weights: torch.Tensor
    topk_indices: torch.Tensor
    router_probs: torch.Tensor
    router_probs_clean: torch.Tensor
    router_logits: torch.Tensor
    entropy: torch.Tensor


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

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"noise_std={self.noise_std}, noise_anneal_steps={self.noise_anneal_steps}, "
            f"straight_through={self.straight_through}, normalize_topk={self.normalize_topk}"
        )

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

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x_TD = x.reshape(-1, x.shape[-1])
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_clean_TE = logits_TE.softmax(dim=-1)
            if self.training and self.noise_std > 0:
                noise_TE = self.noise_std_now() * torch.randn_like(logits_TE)
                probs_TE = (logits_TE + noise_TE).softmax(dim=-1)
            else:
                probs_TE = probs_clean_TE
            topk_probs_TK, topk_indices_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.top_k == 1 and self.straight_through:
                if self.training:
                    weights_TK = (topk_probs_TK - topk_probs_TK.detach()) + 1.0  # exactly 1.0 forward
                else:
                    weights_TK = torch.ones_like(topk_probs_TK)
            elif self.normalize_topk:
                weights_TK = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True)
            else:
                weights_TK = topk_probs_TK
        return RouterOutput(
            topk_weights=weights_TK,
            topk_indices=topk_indices_TK,
            router_probs=probs_TE,
            router_probs_clean=probs_clean_TE,
            router_logits=logits_TE,
            entropy=entropy_from_probs(probs_clean_TE),
        )
