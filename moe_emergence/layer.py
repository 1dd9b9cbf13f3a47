"""MoEWrapper: Router + ExpertBank (+ optional shared expert), a drop-in replacement for ``GPT2MLP``.

Shapes (legend: docs/architecture.md): B rows, S positions, T = B * S tokens, D model width, F expert
intermediate width, E experts, K experts per token, C expert capacity (expert choice), A assignments.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN

from moe_emergence.config import MoEConfig
from moe_emergence.experts import ExpertBank
from moe_emergence.routing import Router, RouterOutput
from moe_emergence.token_mask import as_token_mask

if TYPE_CHECKING:
    from moe_emergence.kernels.cuda_graph import LayerGraph

# the RouterOutput fields of token-choice routing, in the order a whole-layer CUDA graph returns them after y
GRAPHED_ROUTER_FIELDS = (
    "topk_weights",
    "topk_indices",
    "router_probs",
    "router_probs_clean",
    "router_logits",
    "entropy",
)


def graphed_fields(routing: RouterOutput) -> tuple[torch.Tensor, ...]:
    """``routing``'s fields a CUDA graph returns (``GRAPHED_ROUTER_FIELDS``), in that order."""
    return tuple(getattr(routing, f) for f in GRAPHED_ROUTER_FIELDS)


def from_graphed_fields(fields) -> RouterOutput:
    """The ``RouterOutput`` of ``fields`` as ``graphed_fields`` lists them (the variant fields None)."""
    return RouterOutput(**dict(zip(GRAPHED_ROUTER_FIELDS, fields, strict=True)))


def whole_layer_graph_unsupported(routing) -> str | None:
    """Why a whole-layer CUDA graph (``kernels.cuda_graph.LayerGraph``) cannot take a layer routed like
    ``routing`` (an ``MoEConfig`` or a ``Router``: the same field names), or None where it can. It takes
    token-choice top-k routing with noise, straight-through, normalisation and a selection bias; the other
    variants (expert choice, capacity, random routing, expert dropout) keep the experts-only graph."""
    for name, off, off_yaml in (
        ("routing", "token_choice", "token_choice"),
        ("capacity_factor", None, "null"),
        ("random_routing_prob", 0.0, "0"),
        ("expert_dropout", 0.0, "0"),
    ):
        value = getattr(routing, name)
        if value != off:
            return f"model.moe.{name}={value}; whole-layer graphs take {name}={off_yaml} only"
    return None


class Affine(nn.Module):
    """``x @ weight + bias`` with GPT-2's Conv1D layout (weight ``[in, out]``), zero-initialised.

    Not a ``Conv1D`` / ``nn.Linear`` on purpose: transformers' ``_init_weights`` re-draws those after
    the model's own init; the model inits these explicitly (``GPT2MoEForCausalLM.__init__``).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class SharedExpert(nn.Module):
    """One dense GPT-2 MLP (``c_fc``, ``c_proj``; the same keys and layout as ``GPT2MLP``), always on."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.c_fc = Affine(d_model, d_ff)
        self.c_proj = Affine(d_ff, d_model)
        self.act = ACT2FN[activation]

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x_TD)))


class MoEWrapper(nn.Module):
    """``forward(hidden_BSD, token_mask_T=None) -> (hidden_BSD, RouterOutput)``: ``GPT2MLP``'s function
    plus what the router decided (for the objective and telemetry; ``GPT2MoEBlock`` passes both on).

    ``y_t = dropout(sum_k w_tk * expert_{i_tk}(x_t))`` with the router's weights w and indices i.

    Expert choice dispatches the E * C (token, expert) slots through the same expert backend by
    gathering rows: ``y_AD = experts(x_TD[token_A], expert_A, weight_A)``, then
    ``y_TD = sum over pairs of y_AD`` in float32 (any backend works unchanged). C is static; slots an
    expert did not take (``RouterOutput.ec_taken`` False: past the real-token capacity, padding, a
    removed expert) have weight 0 and are not computed (``ExpertBank``): such a row of ``y_AD`` is 0 and
    gets no gradient.

    Shared expert: ``y_t = (1 - g_t) * routed_t + g_t * shared_t`` in float32, with ``g_t`` the fixed
    ``shared_expert_weight`` or the learned ``sigmoid(x_t . w_g + b_g)``. With copy-init experts and a
    shared expert copied from the same dense MLP, this is the dense MLP at init for any g.

    ``token_mask_T`` (``[T]``, 1 = real token; None = all real) keeps padding from taking expert
    capacity and from being chosen by experts (capacities count real tokens only); ``expert_mask_E``
    (bool ``[E]``, False = removed) is passed to the router (ablations).

    ``cuda_graph``: None (the default), or a ``kernels.cuda_graph.LayerGraph`` set by the trainer
    (``train.cuda_graphs``) for token-choice routing (``whole_layer_graph_unsupported``) and a sync-free
    backend on a GPU; then forwards in training mode with autograd on and no ``expert_mask_E`` replay the whole
    layer (router, experts, shared expert, dropout) from CUDA graphs: the same kernels and results, one launch
    forward and one backward (each forward's backward must run before the next forward of the same shape).
    Forward hooks on the submodules do not run on replays. Not part of the state dict; set it to None to run
    the layer directly again (e.g. after moving the model off the GPU).
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
            routing=config.routing,
            capacity_factor=config.capacity_factor,
            overflow=config.overflow,
            bias_update_rate=config.bias_update_rate,
            random_routing_prob=config.random_routing_prob,
            expert_dropout=config.expert_dropout,
        )
        self.experts = ExpertBank(
            config.num_experts, d_model, d_ff, activation=activation, backend=config.backend
        )
        self.shared_gate_kind: str | None = None
        if config.shared_expert:
            self.shared_expert = SharedExpert(d_model, d_ff, activation)
            self.shared_gate_kind = config.shared_expert_gate
            self.shared_expert_weight = float(config.shared_expert_weight)
            if self.shared_gate_kind == "learned":
                self.shared_gate = Affine(d_model, 1)  # weight [D, 1], bias [1], float32 maths
                self.reset_shared_gate()
        self.dropout = nn.Dropout(dropout)
        self.cuda_graph: LayerGraph | None = None

    def extra_repr(self) -> str:
        """The layer's own settings (its router's, experts' and dropout's are theirs): the shared expert's mix."""
        if self.shared_gate_kind is None:
            return "shared_expert=None"
        return f"shared_expert_gate={self.shared_gate_kind}, shared_expert_weight={self.shared_expert_weight}"

    @torch.no_grad()
    def reset_shared_gate(self) -> None:
        """Learned gate init: ``w_g = 0``, ``b_g = logit(shared_expert_weight)``."""
        w = self.shared_expert_weight
        nn.init.zeros_(self.shared_gate.weight)
        self.shared_gate.bias.fill_(math.log(w / (1.0 - w)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask_T: torch.Tensor | None = None,
        expert_mask_E: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        graph = self.cuda_graph
        if (
            graph is not None
            and not graph.capturing  # the capture's own call of this forward
            and expert_mask_E is None
            and self.training
            and torch.is_grad_enabled()
        ):
            as_token_mask(token_mask_T, x_TD.shape[0])  # checked as the router would; it does not read it
            y_TD, routing = self._graphed(graph, x_TD)
        else:
            y_TD, routing = self._direct(x_TD, token_mask_T, expert_mask_E)
        return y_TD.reshape(hidden_states.shape), routing

    def _direct(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None, expert_mask_E: torch.Tensor | None
    ) -> tuple[torch.Tensor, RouterOutput]:
        routing = self.router(x_TD, token_mask_T, expert_mask_E)  # checks the masks' shapes
        if routing.ec_tokens is None:
            y_TD = self.experts(x_TD, routing.topk_indices, routing.topk_weights)
        else:
            y_TD = self._expert_choice_dispatch(x_TD, routing.ec_tokens, routing.ec_weights)
        if self.shared_gate_kind is not None:
            y_TD = self._mix_shared(x_TD, y_TD)
        return self.dropout(y_TD), routing

    def _graphed(self, graph: LayerGraph, x_TD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """This forward replayed from ``graph``: the direct forward of ``x_TD`` (no mask: token-choice routing
        does not read it) run with the parameters as arguments (``torch.func.functional_call``). Raises
        ``ValueError`` for a layer the graph cannot take."""
        why = whole_layer_graph_unsupported(self.router)
        if why is not None or self.experts.cuda_graph is not None:
            why = why or "its experts have a CUDA graph of their own (ExpertBank.cuda_graph)"
            raise ValueError(f"MoEWrapper.cuda_graph cannot take this layer: {why}")
        names, params = zip(*self.named_parameters(), strict=True)
        if not (x_TD.requires_grad or any(p.requires_grad for p in params)):  # no backward will follow
            return self._direct(x_TD, None, None)

        def layer(x: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y, routing = torch.func.functional_call(self, dict(zip(names, p, strict=True)), (x,))
            return (y, *graphed_fields(routing))

        # what the layer computes beyond its arguments: a change makes a new capture (buffers are read in place
        # at their address: one replaced by another tensor is a new capture, never a read of freed memory); each
        # module's settings (router, experts, dropout, the shared expert's mix) are in its extra_repr
        key = (
            tuple((b.data_ptr(), b.shape, b.dtype) for b in self.buffers()),
            tuple((m.training, m.extra_repr()) for m in self.modules()),
        )
        y_TD, *fields = graph(key, layer, (x_TD,), params)
        return y_TD, from_graphed_fields(fields)

    def _expert_choice_dispatch(
        self, x_TD: torch.Tensor, tokens_EC: torch.Tensor, weights_EC: torch.Tensor
    ) -> torch.Tensor:
        E, C = tokens_EC.shape
        token_A = tokens_EC.reshape(-1)
        expert_A = torch.arange(E, device=x_TD.device).repeat_interleave(C)
        y_AD = self.experts(x_TD[token_A], expert_A[:, None], weights_EC.reshape(-1, 1))
        y_TD = torch.zeros(x_TD.shape, device=x_TD.device, dtype=torch.float32)
        return y_TD.index_add_(0, token_A, y_AD.float()).to(x_TD.dtype)

    def _mix_shared(self, x_TD: torch.Tensor, routed_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared_expert(x_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.shared_gate_kind == "learned":
                g_T1 = torch.sigmoid(
                    x_TD.float() @ self.shared_gate.weight.float() + self.shared_gate.bias.float()
                )
            else:
                g_T1 = torch.full((1, 1), self.shared_expert_weight, device=x_TD.device)
            y_TD = (1.0 - g_T1) * routed_TD.float() + g_T1 * shared_TD.float()
        return y_TD.to(x_TD.dtype)
