"""The MoE objective: router losses (one formula each, float32) and how they join the LM loss.

Shapes (legend: docs/architecture.md): T tokens, E experts, K experts per token, L MoE layers.
``mask_T`` is 1 for real tokens and 0 for padding (``[T]``, or any form ``token_mask.as_token_mask``
accepts, e.g. the model's ``[B, S]`` attention mask); masked tokens never count. A batch with no real
token gives 0 (not NaN). Each formula also takes leading dimensions (``[L, T, E]``: every MoE layer of a
forward at once, one result per layer); the mask is the forward's, shared by every layer.

The objective, written once (``moe_objective``) and used by the model's forward and by the trainer::

    loss = w_lm * lm_loss + w_batch * lb_coef * lb_loss + w_tok * (z_coef * z_loss + entropy_coef * entropy_loss)

with ``lb_loss``, ``z_loss``, ``entropy_loss`` the means over MoE layers of the per-layer terms below, and
the weights ``Shares`` all 1 for one forward on its own. The trainer sums one such objective per
micro-batch with the micro-batch's shares of the optimizer step (``Shares``), so the step's loss is
token-weighted for the LM, z and entropy terms and a micro-batch mean for the load-balance term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_emergence.routing import RouterOutput
from moe_emergence.token_mask import as_token_mask


@dataclass(frozen=True)
class TokenWeights:
    """Which of a forward's T tokens count, worked out once and shared by every masked mean and count of it.

    ``real_T``: ``[T]`` bool, True for a real token, or None (every token real: no mask, so no masking op at
    all); ``count``: the number of real tokens, at least 1 (a 0-d tensor on the mask's device), so that a batch
    with no real token gives 0, not NaN. A mask of all ones and no mask give the same values bit for bit (the
    same ops on the values, a division by a device tensor either way: CUDA divides by a Python number as a
    multiplication by its reciprocal, which may differ in the last bit).
    """

    real_T: torch.Tensor | None
    count: torch.Tensor

    @classmethod
    def of(cls, mask_T: torch.Tensor | None, num_tokens: int, device: torch.device) -> TokenWeights:
        """From a token mask (any form ``token_mask.as_token_mask`` accepts; None = all real); raises
        ``ValueError`` for a mask of another shape."""
        real_T = as_token_mask(mask_T, num_tokens)
        if real_T is None:
            return cls(None, torch.full((), max(num_tokens, 1), dtype=torch.float32, device=device))
        real_T = real_T.to(device)
        return cls(real_T, real_T.sum().clamp_min(1))

    def mean(self, values_LT: torch.Tensor) -> torch.Tensor:
        """``sum_t real_t v_t / max(1, sum_t real_t)`` over the last dimension of ``values`` (``[T]`` or
        ``[..., T]``, float32): one mean per leading index; padding never counts, even if non-finite."""
        v_LT = values_LT.float()
        # torch.where keeps the values' layout (masked_fill's copy would not: another summation order)
        if self.real_T is not None:
            v_LT = torch.where(self.real_T, v_LT, 0.0)
        return v_LT.sum(-1) / self.count

    def per_assignment(self, shape_LTK: torch.Size) -> torch.Tensor:
        """Float32 weights of the routing assignments ``[..., T, K]``: 1 for a real token's, 0 for padding's
        (an expanded view, no copy)."""
        if self.real_T is None:
            return torch.ones((), device=self.count.device).expand(shape_LTK)
        return self.real_T.float()[:, None].expand(shape_LTK)


def tokens_per_expert(
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
    assignment_mask_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of routing assignments per expert, float32 ``[E]`` (each real token contributes K); with
    leading dimensions (``[L, T, K]``: one count per layer) ``[L, E]``.

    ``assignment_mask_TK`` (optional, bool or 0/1, the shape of ``topk_indices_TK``) counts only some
    assignments, e.g. ``~RouterOutput.dropped`` to leave out those past capacity. Raises ``ValueError`` on
    a mask of the wrong shape.
    """
    tokens = TokenWeights.of(mask_T, topk_indices_TK.shape[-2], topk_indices_TK.device)
    return _tokens_per_expert(topk_indices_TK, num_experts, tokens, assignment_mask_TK)


def _tokens_per_expert(
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    tokens: TokenWeights,
    assignment_mask_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    *lead, T, K = topk_indices_TK.shape
    device = topk_indices_TK.device
    w_TK = tokens.per_assignment(topk_indices_TK.shape)
    if assignment_mask_TK is not None:
        if assignment_mask_TK.shape != topk_indices_TK.shape:
            raise ValueError(
                f"assignment mask has shape {tuple(assignment_mask_TK.shape)}, "
                f"expected {tuple(topk_indices_TK.shape)}"
            )
        w_TK = w_TK * assignment_mask_TK.to(w_TK)
    tokens_per_expert_E = torch.zeros(*lead, num_experts, device=device, dtype=torch.float32)
    return tokens_per_expert_E.scatter_add_(
        -1, topk_indices_TK.reshape(*lead, T * K), w_TK.reshape(*lead, T * K)
    )


def masked_mean(values_T: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values_T`` over the real tokens (float32 scalar; 0 when there are none); with leading
    dimensions (``[L, T]``) one mean per leading index (``[L]``).

    Used for the entropy loss (``RouterOutput.entropy``) and for telemetry fractions, e.g.
    ``masked_mean(dropped.float().mean(-1), mask)`` = dropped_frac and ``masked_mean(unrouted.float(),
    mask)`` = unrouted_frac.
    """
    return TokenWeights.of(mask_T, values_T.shape[-1], values_T.device).mean(values_T)


def expert_fractions(
    topk_indices_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """f_i: fraction of routing assignments that go to expert i, ``[E]``, sums to 1 (0 if no tokens);
    ``[L, T, K]`` indices give ``[L, E]``."""
    return fractions_of(tokens_per_expert(topk_indices_TK, num_experts, mask_T))


def fractions_of(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """f_i = c_i / sum_j c_j from assignment counts ``[E]`` (float32; 0 when nothing was routed); ``[L, E]``
    gives one distribution per row."""
    c_E = tokens_per_expert_E.float()
    return c_E / c_E.sum(-1, keepdim=True).clamp_min(1.0)


def mean_router_probs(router_probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """P_i: mean router probability of expert i over the (unmasked) tokens, ``[E]`` (``[L, E]`` for
    ``[L, T, E]``)."""
    tokens = TokenWeights.of(mask_T, router_probs_TE.shape[-2], router_probs_TE.device)
    return tokens.mean(router_probs_TE.transpose(-1, -2))  # the mean runs over the last dimension


def load_balance_loss(
    router_probs_TE: torch.Tensor,
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
    fractions_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balance loss ``E * sum_i f_i * P_i`` (scalar, float32; Fedus et al. 2021,
    "Switch Transformers", eq. 4); for ``[L, T, E]`` probabilities and ``[L, T, K]`` indices, one loss per
    layer (``[L]``).

    f_i = fraction of the T*k routing assignments sent to expert i (no gradient: it comes from argmax),
    P_i = mean over tokens of the router probability of expert i (carries the gradient).
    Uniform routing gives 1; every token sent to one expert with probability 1 gives E.

    ``fractions_E`` overrides f (used for global balancing, where f is computed over the whole
    data-parallel batch by the trainer): ``[E]`` (the same f for every layer) or one row per layer
    (``[L, E]``); any other shape raises ``ValueError``.
    """
    tokens = TokenWeights.of(mask_T, router_probs_TE.shape[-2], router_probs_TE.device)
    return _load_balance_loss(router_probs_TE, topk_indices_TK, num_experts, tokens, fractions_E)


def _load_balance_loss(
    router_probs_TE: torch.Tensor,
    topk_indices_TK: torch.Tensor,
    num_experts: int,
    tokens: TokenWeights,
    fractions_E: torch.Tensor | None,
) -> torch.Tensor:
    if fractions_E is None:
        fractions_E = fractions_of(_tokens_per_expert(topk_indices_TK, num_experts, tokens))
    P_E = tokens.mean(router_probs_TE.transpose(-1, -2))
    if fractions_E.shape not in (P_E.shape, P_E.shape[-1:]):
        raise ValueError(f"fractions_E has shape {tuple(fractions_E.shape)}, expected {tuple(P_E.shape)}")
    return num_experts * (fractions_E.detach().float() * P_E).sum(-1)


def z_loss(router_logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens (scalar, float32; Zoph et al. 2022,
    "ST-MoE", eq. 5); ``[L, T, E]`` logits give one loss per layer (``[L]``).

    Zero logits give (ln E)^2.
    """
    return _z_loss(
        router_logits_TE, TokenWeights.of(mask_T, router_logits_TE.shape[-2], router_logits_TE.device)
    )


def _z_loss(router_logits_TE: torch.Tensor, tokens: TokenWeights) -> torch.Tensor:
    return tokens.mean(torch.logsumexp(router_logits_TE.float(), dim=-1).square())


def routed_tokens_per_expert(
    r: RouterOutput, num_experts: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignments each expert actually computed, float32 ``[E]``: padding and capacity-dropped
    assignments excluded; with expert choice, the slots each expert took (``RouterOutput.ec_taken``:
    real tokens within the real-token capacity, removed experts none). The load that aux-loss-free
    balancing (``Router.update_selection_bias``) evens out."""
    if r.ec_tokens is not None:
        return r.ec_taken.float().sum(1)  # padding is never taken
    kept_TK = None if r.dropped is None else ~r.dropped
    return tokens_per_expert(r.topk_indices, num_experts, mask_T, assignment_mask_TK=kept_TK)


@dataclass(frozen=True)
class LossCoefs:
    """Coefficients of the router losses in the objective (``MoEConfig.loss_coefs`` gives the ones in force at
    an optimizer step). Plain floats; ``lb_coef`` and ``z_coef`` may be 0-d float32 tensors holding such values
    (the trainer's, read on the device: a CUDA graph of the step takes a schedule's new values as inputs)."""

    lb_coef: float | torch.Tensor
    z_coef: float | torch.Tensor
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        """Raises ``ValueError`` unless lb_coef and z_coef are finite numbers >= 0 (or 0-d float32 tensors: their
        values are not read, no host sync) and entropy_coef is a finite number (as ``MoEConfig`` requires)."""
        for name in ("lb_coef", "z_coef", "entropy_coef"):
            v = getattr(self, name)
            if name != "entropy_coef" and isinstance(v, torch.Tensor):
                if v.shape != () or v.dtype != torch.float32:
                    raise ValueError(
                        f"LossCoefs.{name} is a tensor of shape {tuple(v.shape)} and {v.dtype}: a 0-d float32 "
                        "tensor or a finite number >= 0"
                    )
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (name != "entropy_coef" and v < 0):
                allowed = "a finite number" if name == "entropy_coef" else "a finite number >= 0"
                raise ValueError(f"LossCoefs.{name}={v!r} is invalid: {allowed}")


@dataclass(frozen=True)
class Shares:
    """Weights of one forward's terms in the loss being differentiated (module docstring): ``lm`` its
    predicted tokens / the step's, ``tokens`` its real tokens / the step's, ``batch`` 1 / the number of
    micro-batches (times processes). All 1 (the default) for a forward on its own. Floats or 0-d tensors."""

    lm: float | torch.Tensor = 1.0
    tokens: float | torch.Tensor = 1.0
    batch: float | torch.Tensor = 1.0


@dataclass
class MoEObjective:
    """What ``moe_objective`` computed for one forward: the weighted ``loss`` and each term, float32.

    ``lb_loss_L``, ``z_loss_L``, ``entropy_loss_L``: ``[L]`` per MoE layer (block order), unweighted;
    ``lb_loss``, ``z_loss``, ``entropy_loss``: their means over layers, unweighted.
    """

    loss: torch.Tensor
    lb_loss_L: torch.Tensor
    z_loss_L: torch.Tensor
    entropy_loss_L: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy_loss: torch.Tensor


def layer_tokens_per_expert(
    router_outputs: Sequence[RouterOutput], num_experts: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``[L, E]`` assignments per expert of each MoE layer (``tokens_per_expert``); summed across
    processes, it gives ``moe_objective`` the global f_i of ``balance_scope: global``."""
    return tokens_per_expert(torch.stack([r.topk_indices for r in router_outputs]), num_experts, mask_T)


def moe_objective(
    lm_loss: torch.Tensor,
    router_outputs: Sequence[RouterOutput],
    mask_T: torch.Tensor | None,
    num_experts: int,
    coefs: LossCoefs,
    *,
    tokens_per_expert_LE: torch.Tensor | None = None,
    shares: Shares = Shares(),
) -> MoEObjective:
    """The objective of one forward (module docstring), each router term computed once per layer (all
    layers in one batched call of each formula).

    lm_loss: scalar mean next-token cross entropy of the forward.
    router_outputs: the forward's ``RouterOutput`` of each MoE layer, in block order (L >= 1).
    mask_T: ``[T]`` 1 for real tokens, or None (all real).
    tokens_per_expert_LE: ``[L, E]`` counts behind f_i (e.g. summed over processes); None = this
        forward's own (``layer_tokens_per_expert``).
    The entropy term joins the loss only when ``entropy_coef != 0`` (so a non-finite entropy cannot
    reach a loss that does not use it). Raises ``ValueError`` for a mask or counts of the wrong shape.
    """
    L = len(router_outputs)
    if tokens_per_expert_LE is not None and tokens_per_expert_LE.shape != (L, num_experts):
        raise ValueError(
            f"tokens_per_expert_LE has shape {tuple(tokens_per_expert_LE.shape)}, expected ({L}, {num_experts})"
        )
    # all layers at once: each formula runs once on [L, T, ...], the token weights worked out once (a few
    # dozen kernel launches for any L)
    probs_LTE = torch.stack([r.router_probs for r in router_outputs])
    tokens = TokenWeights.of(mask_T, probs_LTE.shape[-2], probs_LTE.device)
    f_LE = None if tokens_per_expert_LE is None else fractions_of(tokens_per_expert_LE)
    topk_LTK = torch.stack([r.topk_indices for r in router_outputs])
    lb_L = _load_balance_loss(probs_LTE, topk_LTK, num_experts, tokens, f_LE)
    z_L = _z_loss(torch.stack([r.router_logits for r in router_outputs]), tokens)
    ent_L = tokens.mean(torch.stack([r.entropy for r in router_outputs]))
    lb, z, ent = lb_L.mean(), z_L.mean(), ent_L.mean()
    token_terms = coefs.z_coef * z
    if coefs.entropy_coef != 0:
        token_terms = token_terms + coefs.entropy_coef * ent
    loss = shares.lm * lm_loss.float() + (shares.batch * coefs.lb_coef) * lb + shares.tokens * token_terms
    return MoEObjective(loss, lb_L, z_L, ent_L, lb, z, ent)
