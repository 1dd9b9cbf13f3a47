"""MoEWrapper: Router + ExpertBank, a drop-in replacement for ``GPT2MLP``.

Shapes: B batch, L sequence length, T = B * L tokens, D model width, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_emergence.config import MoEConfig
from moe_emergence.experts import ExpertBank
from moe_emergence.routing import Router, RouterOutput


class MoEWrapper(nn.Module):
    """``forward(hidden_BLD) -> hidden_BLD``, exactly like ``GPT2MLP``.

    ``y_t = dropout(sum_k w_tk * expert_{i_tk}(x_t))`` with the router's weights w and indices i.
    The router output of the last forward is kept in ``last_router_output`` for the model's losses
    and for telemetry (it is overwritten by every forward, gradient-checkpoint recomputation included).
    """

    def __init__(
        self, config: MoEConfig, d_model: int, d_ff: int, activation: str = "gelu_new", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.router = Router(
            d_model,
            config.num_experts,
            top_k=config.top_k,
            noise_std=config.noise_std,
            noise_anneal_steps=config.noise_anneal_steps,
            straight_through=config.straight_through,
            normalize_topk=config.normalize_topk,
        )
        self.experts = ExpertBank(
            config.num_experts, d_model, d_ff, activation=activation, backend=config.backend
        )
        self.dropout = nn.Dropout(dropout)
        self.last_router_output: RouterOutput | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing = self.router(x_TD)
        self.last_router_output = routing
        y_TD = self.experts(x_TD, routing.topk_indices, routing.topk_weights)
        return self.dropout(y_TD.reshape(hidden_states.shape))
