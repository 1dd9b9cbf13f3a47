"""ExpertBank: E GPT-2 MLPs stored as stacked weights, and the dispatch backends that run them.

Shapes (legend: docs/architecture.md): T tokens, D model width, F expert intermediate width, E experts,
K experts per token, A = T * K assignments. Weights follow GPT-2's Conv1D layout ``[in, out]``:
    w1_EDF [E, D, F], b1_EF [E, F]  (c_fc),   w2_EFD [E, F, D], b2_ED [E, D]  (c_proj).
Expert e computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``; a token's output is
``sum_k weights[t, k] * expert_{indices[t, k]}(x_t)``, combined in float32.

Zero-weight assignments: an assignment whose weight ``weights[t, k]`` is exactly 0 is not computed, in every
backend, forward and backward. It adds nothing to y (not ``0 * expert(x_t)``, NaN where that output is inf or
NaN) and receives no gradient: its expert's parameters, ``x_t`` and ``weights[t, k]`` itself get exactly 0
from it (d weights[t, k] = 0, not ``<dy_t, expert(x_t)>``). So a capacity-dropped token never touches the
expert that dropped it, whatever that expert's bias or output for it, or the token's own row of x.
``routing_meta`` does it for all backends: such an assignment gets the sentinel expert id E and sorts after
every expert's rows. The router's gradient is the same as if the assignment were computed (on a finite
output; on a non-finite one computing it could make that gradient NaN): a router weight is exactly 0 only
where capacity or a mask zeroed it (``masked_fill`` / a 0-1 factor: 0 flows upstream whatever the weight's
own gradient) or where its softmax probability underflowed to 0 (softmax's backward scales each entry's
gradient by its probability: 0), so the chain from such a weight to the router logits is 0 either way;
tests/test_isolation.py checks this for every routing variant that makes zero weights.

Backends share one signature::

    fn(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation) -> y_TD

``eager`` (below) is the plain PyTorch reference; faster ones live in ``moe_emergence.kernels`` and
are tested against it, gradients included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN

from moe_emergence.kernels.routing_meta import routing_meta  # torch only: kernels/__init__ imports no triton

if TYPE_CHECKING:
    from moe_emergence.kernels.cuda_graph import ExpertsGraph

ExpertsFn = Callable[..., torch.Tensor]


def eager_experts(
    x_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    b1_EF: torch.Tensor,
    w2_EFD: torch.Tensor,
    b2_ED: torch.Tensor,
    indices_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Reference dispatch: sort the T*K assignments by expert, run each expert on its rows, scatter back.

    The sort is ``routing_meta``'s (the fast backends' own): zero-weight assignments sort last and are left
    out. One host sync (the per-expert row counts used to split the sorted rows); every expert's weights
    take part in the graph even when it receives no token.
    """
    T = indices_TK.shape[0]
    act = ACT2FN[activation]
    meta = routing_meta(indices_TK, w1_EDF.shape[0], weights_TK)
    counts = meta.offsets_E1.diff().tolist()  # rows of each expert (the one sync); dead rows come after
    live = sum(counts)
    token_A, order_A = meta.token_A[:live], meta.order_A[:live]
    x_AD = x_TD[token_A]
    outs = []
    for e, x_eD in enumerate(x_AD.split(counts)):
        h_eF = act(x_eD @ w1_EDF[e] + b1_EF[e])
        outs.append(h_eF @ w2_EFD[e] + b2_ED[e])
    y_AD = torch.cat(outs).float() * weights_TK.reshape(-1)[order_A, None].float()
    y_TD = torch.zeros(T, x_TD.shape[-1], device=x_TD.device, dtype=torch.float32)
    return y_TD.index_add_(0, token_A, y_AD).to(x_TD.dtype)


def backend_name(name: str, device: torch.device, d_model: int | None = None, d_ff: int | None = None) -> str:
    """The backend that ``name`` stands for on ``device``: ``name`` itself, or for ``"auto"`` the fastest that runs
    there for experts of size ``d_model`` x ``d_ff`` (``eager`` on the CPU: the fast backends only pay off on a
    GPU). Traceable by ``torch.compile``."""
    from moe_emergence import kernels  # lazy: keeps triton out of the model package's import

    if name != "auto":
        return name
    fast = kernels.available_backends(device, d_model, d_ff) if device.type == "cuda" else []
    return fast[0] if fast else "eager"


def resolve_backend(
    name: str, device: torch.device, d_model: int | None = None, d_ff: int | None = None
) -> ExpertsFn:
    """The experts function of backend ``name`` (``backend_name``: ``"auto"`` picks one); ``ValueError`` for an
    unknown name, ``RuntimeError`` for a backend that cannot run on ``device``.

    Uncached (``get_backend`` is the cached form); traceable by ``torch.compile`` without graph breaks."""
    from moe_emergence import kernels

    name = backend_name(name, device, d_model, d_ff)
    if name == "eager":
        return eager_experts
    if name in kernels.BACKENDS:
        return kernels.load_backend(name, device)
    raise ValueError(f"unknown experts backend {name!r}; allowed: auto, eager, {', '.join(kernels.BACKENDS)}")


# resolved once per (name, device): the eager forward pass does no lookup work
get_backend = functools.cache(resolve_backend)


class ExpertBank(nn.Module):
    """E feed-forward experts with stacked weights; ``forward(x_TD, indices_TK, weights_TK) -> y_TD``.

    An assignment with weight exactly 0 is not computed: it adds nothing to y and receives no gradient, even
    where its expert's output for that token is inf or NaN (module docstring); capacity-dropped assignments
    (weight 0) so never touch the expert that dropped them.

    ``cuda_graph``: None (the default), or a ``kernels.cuda_graph.ExpertsGraph`` set by the trainer
    (``train.cuda_graphs``) for a sync-free backend on a GPU; then calls in training mode with autograd on
    replay the backend's kernels from CUDA graphs (the same kernels and results, one launch forward and one
    backward). Not part of the state dict.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu_new", backend: str = "eager"
    ) -> None:
        super().__init__()
        if activation not in ACT2FN:
            raise ValueError(f"unknown activation {activation!r}; allowed: {sorted(ACT2FN)}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.backend = backend
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model))
        self.cuda_graph: ExpertsGraph | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Random init: weights N(0, std^2) (``w2`` N(0, out_std^2)), biases zero."""
        nn.init.normal_(self.w1_EDF, std=std)
        nn.init.normal_(self.w2_EFD, std=std if out_std is None else out_std)
        nn.init.zeros_(self.b1_EF)
        nn.init.zeros_(self.b2_ED)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation}, backend={self.backend}"
        )

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        # compiled: dynamo traces through a cache wrapper anyway (and warns); it resolves at trace time
        lookup = resolve_backend if torch.compiler.is_compiling() else get_backend
        fn = lookup(self.backend, x_TD.device, self.d_model, self.d_ff)
        params = (self.w1_EDF, self.b1_EF, self.w2_EFD, self.b2_ED)
        if self.cuda_graph is not None and self.training and torch.is_grad_enabled():
            return self.cuda_graph(fn, self.activation, params, x_TD, indices_TK, weights_TK)
        return fn(x_TD, *params, indices_TK, weights_TK, self.activation)
