"""Routing and evaluation statistics: one formula per function, and device-side accumulators.

Shapes (legend: docs/architecture.md): T tokens, E experts, K experts per token, M domains, P flattened
parameters of one expert.
Every formula uses natural logarithms (nats) and treats 0 * log 0 as 0.

Accumulators keep running sums on the model's device; ``add`` never synchronises with the host, so
they can be fed every micro-batch. ``metrics`` moves the sums to the host once.
"""

from __future__ import annotations

import math

import torch

from moe_emergence.losses import masked_mean
from moe_emergence.routing import RouterOutput
from moe_emergence.telemetry import names as keys
from moe_emergence.token_mask import as_token_mask

# ----------------------------------------------------------------------------- formulas


def fractions(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """f_i = c_i / sum_j c_j: share of the routing assignments that went to expert i (0 if none)."""
    tokens_per_expert_E = tokens_per_expert_E.double()
    return tokens_per_expert_E / tokens_per_expert_E.sum().clamp_min(1e-300)


def entropy(p_E: torch.Tensor) -> float:
    """H(p) = -sum_i p_i ln p_i (nats) of a probability vector."""
    p_E = p_E.double()
    return float(-(p_E * torch.log(p_E.clamp_min(1e-300))).sum())


def coefficient_of_variation(f_E: torch.Tensor) -> float:
    """cv = std(f) / mean(f) with the population std; 0 for perfectly balanced routing,
    sqrt(E - 1) when one expert takes everything."""
    f_E = f_E.double()
    mean = f_E.mean()
    return float(f_E.std(unbiased=False) / mean) if mean > 0 else 0.0


def mutual_information(joint_counts_ME: torch.Tensor) -> float:
    """I(domain; expert) = sum_{d,e} p(d,e) ln[p(d,e) / (p(d) p(e))] in nats, from a count table."""
    c = joint_counts_ME.double()
    total = c.sum()
    if total <= 0:
        return 0.0
    p_de = c / total
    p_d = p_de.sum(1, keepdim=True)
    p_e = p_de.sum(0, keepdim=True)
    ratio = p_de / (p_d * p_e).clamp_min(1e-300)
    return float(torch.where(p_de > 0, p_de * torch.log(ratio.clamp_min(1e-300)), 0.0).sum())


def normalized_mutual_information(joint_counts_ME: torch.Tensor) -> float:
    """NMI = I(domain; expert) / H(domain), in [0, 1]; 0 when there is a single domain."""
    h_d = entropy(fractions(joint_counts_ME.double().sum(1)))
    return mutual_information(joint_counts_ME) / h_d if h_d > 0 else 0.0


def expert_divergence(weights_EP: torch.Tensor) -> float:
    """Mean over expert pairs i < j of the cosine distance 1 - cos(w_i, w_j) between flattened expert
    weights; 0 for identical copies (right after ``init: copy`` upcycling), 0 for a single expert."""
    E = weights_EP.shape[0]
    if E < 2:
        return 0.0
    w = torch.nn.functional.normalize(weights_EP.double(), dim=1)
    cos_EE = w @ w.T
    i, j = torch.triu_indices(E, E, offset=1)
    return float((1.0 - cos_EE[i, j]).mean())


def flat_expert_weights(experts: torch.nn.Module) -> torch.Tensor:
    """``[E, P]``: every parameter of each expert (w1, b1, w2, b2) flattened and concatenated."""
    E = experts.w1_EDF.shape[0]
    parts = [_full(p) for p in (experts.w1_EDF, experts.b1_EF, experts.w2_EFD, experts.b2_ED)]
    return torch.cat([p.reshape(E, -1).float() for p in parts], dim=1)


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter: FSDP2 shards parameters as DTensors, gathered here (a collective, so every
    process calls it, as the trainer does for all telemetry)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def variant_metrics(
    router_outputs: dict[int, RouterOutput],
    mask_T: torch.Tensor,
    selection_bias: dict[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Telemetry of the routing variants for one forward, on-device float32 scalars (no sync):
    ``dropped_frac`` (capacity: fraction of real assignments dropped), ``unrouted_frac`` (expert choice:
    fraction of real tokens no expert took), ``selection_bias_e<e>`` (``selection_bias``: ``{block: [E]
    bias}`` of the routers that have one, e.g. ``router.selection_bias``; None = none). Empty with every
    variant off."""
    out = {}
    selection_bias = selection_bias or {}
    for i, r in router_outputs.items():
        if r.dropped is not None:
            out[keys.layer_key(keys.ROUTER, i, "dropped_frac")] = masked_mean(
                r.dropped.float().mean(-1), mask_T
            )
        if r.unrouted is not None:
            out[keys.layer_key(keys.ROUTER, i, "unrouted_frac")] = masked_mean(r.unrouted.float(), mask_T)
        if i in selection_bias:
            for e, b in enumerate(selection_bias[i].detach().unbind()):
                out[keys.layer_key(keys.ROUTER, i, keys.selection_bias(e))] = b
    return out


# ----------------------------------------------------------------------------- accumulators


class RoutingStats:
    """Routing sums of one MoE layer over any number of micro-batches (and, after ``all_reduce``,
    processes). Layout of the flat buffer: ``tokens_per_expert_E | prob_sum_E | joint_ME | entropy_sum | tokens``.

    tokens_per_expert_E: routing assignments per expert (all k of every real token).
    prob_sum_E: sum over real tokens of the clean router probabilities.
    joint_ME: top-1 expert of real tokens per domain (tokens with domain id < 0 are left out).
    entropy_sum: sum over real tokens of the per-token entropy of the clean probabilities.
    tokens: number of real tokens.
    """

    def __init__(self, num_experts: int, num_domains: int, device: torch.device | str) -> None:
        self.E, self.M = num_experts, max(num_domains, 1)
        self.buf = torch.zeros(2 * self.E + self.M * self.E + 2, dtype=torch.float64, device=device)

    def add(self, r: RouterOutput, mask_T: torch.Tensor, domain_T: torch.Tensor | None = None) -> None:
        """Add one micro-batch (no host sync). ``mask_T`` 1 for real tokens (``[T]`` or ``[B, S]``);
        ``domain_T`` domain ids."""
        E, M = self.E, self.M
        idx_TK = r.topk_indices.detach()
        w_T = as_token_mask(mask_T, idx_TK.shape[0]).to(self.buf.device, torch.float64)
        K = idx_TK.shape[1]
        tokens_per_expert_E = torch.zeros(E, dtype=torch.float64, device=self.buf.device)
        tokens_per_expert_E.index_add_(0, idx_TK.reshape(-1), w_T.repeat_interleave(K))
        probs_TE = r.router_probs_clean.detach().double()
        if domain_T is None:
            domain_T = torch.zeros_like(w_T, dtype=torch.long)
        domain_T = domain_T.reshape(-1).to(self.buf.device)
        valid_T = w_T * (domain_T >= 0)
        joint = torch.zeros(M * E, dtype=torch.float64, device=self.buf.device)
        joint.index_add_(0, domain_T.clamp_min(0) * E + idx_TK[:, 0], valid_T)
        self.buf += torch.cat(
            [
                tokens_per_expert_E,
                (probs_TE * w_T[:, None]).sum(0),
                joint,
                (r.entropy.detach().double() * w_T).sum()[None],
                w_T.sum()[None],
            ]
        )

    def reset(self) -> None:
        self.buf.zero_()

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        return self.buf[: self.E]

    @property
    def joint_ME(self) -> torch.Tensor:
        return self.buf[2 * self.E : 2 * self.E + self.M * self.E].reshape(self.M, self.E)

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/expert{i}_frac, entropy, marginal_entropy, max_frac, cv, dead_experts, domain_mi,
        domain_nmi`` from the sums (one host transfer)."""
        buf = self.buf.cpu()
        E, M = self.E, self.M
        tokens_per_expert_E, prob_sum_E = buf[:E], buf[E : 2 * E]
        joint_ME = buf[2 * E : 2 * E + M * E].reshape(M, E)
        entropy_sum, tokens = float(buf[-2]), float(buf[-1])
        f_E = fractions(tokens_per_expert_E)
        by_name = {keys.expert_frac(i): float(f_E[i]) for i in range(E)}
        by_name["entropy"] = entropy_sum / tokens if tokens > 0 else 0.0
        by_name["marginal_entropy"] = entropy(prob_sum_E / tokens) if tokens > 0 else 0.0
        by_name["max_frac"] = float(f_E.max())
        by_name["cv"] = coefficient_of_variation(f_E)
        by_name["dead_experts"] = float((tokens_per_expert_E == 0).sum())
        by_name["domain_mi"] = mutual_information(joint_ME)
        by_name["domain_nmi"] = normalized_mutual_information(joint_ME)
        return {keys.join(prefix, name): v for name, v in by_name.items()}


class LayerRoutingStats:
    """``RoutingStats`` for every MoE layer: ``{block index: RoutingStats}`` plus one all-reduce."""

    def __init__(self, layers: list[int], num_experts: int, num_domains: int, device) -> None:
        self.layers = {i: RoutingStats(num_experts, num_domains, device) for i in layers}

    def add(self, router_outputs: dict[int, RouterOutput], mask_T, domain_T=None) -> None:
        for i, r in router_outputs.items():
            self.layers[i].add(r, mask_T, domain_T)

    def all_reduce(self, reduce_fn) -> None:
        """Sum the buffers across processes with ``reduce_fn(tensor) -> summed tensor`` (one call)."""
        if not self.layers:
            return
        flat = reduce_fn(torch.cat([s.buf for s in self.layers.values()]))
        for s, part in zip(
            self.layers.values(), flat.split([s.buf.numel() for s in self.layers.values()]), strict=True
        ):
            s.buf.copy_(part)

    def reset(self) -> None:
        for s in self.layers.values():
            s.reset()

    def metrics(self, prefix: str = keys.ROUTER) -> dict[str, float]:
        out = {}
        for i, s in self.layers.items():
            out.update(s.metrics(keys.layer_prefix(prefix, i)))
        return out

    def joint_counts(self) -> dict[int, torch.Tensor]:
        """``{layer: [M, E] top-1 counts}`` on the host (for heatmaps)."""
        return {i: s.joint_ME.cpu().clone() for i, s in self.layers.items()}


class DomainLossStats:
    """Token-weighted next-token loss per domain: sums of per-token cross entropy and token counts."""

    def __init__(self, num_domains: int, device) -> None:
        self.M = num_domains
        self.buf = torch.zeros(2 * num_domains, dtype=torch.float64, device=device)

    def add(self, token_loss_T: torch.Tensor, domain_T: torch.Tensor, mask_T: torch.Tensor) -> None:
        """``token_loss_T`` cross entropy of each predicted token, ``domain_T`` its domain id,
        ``mask_T`` 1 where the token counts (no host sync)."""
        rows = domain_T.shape[0] if domain_T.dim() == 2 else None
        w_T = as_token_mask(mask_T, domain_T.numel(), rows) & (domain_T.reshape(-1) >= 0)
        m_T = domain_T.reshape(-1).clamp_min(0)
        loss_T = torch.where(w_T, token_loss_T.reshape(-1).double(), 0.0)
        self.buf[: self.M].index_add_(0, m_T, loss_T)
        self.buf[self.M :].index_add_(0, m_T, w_T.double())

    def metrics(self, domains: list[str], prefix: str = keys.EVAL) -> dict[str, float]:
        """``{prefix}/lm_loss`` (all tokens) and ``{prefix}/loss_{domain}``, ``{prefix}/ppl_{domain}``."""
        buf = self.buf.cpu()
        loss_M, n_M = buf[: self.M], buf[self.M :]
        out = {keys.lm_loss(prefix): float(loss_M.sum() / n_M.sum().clamp_min(1))}
        for d, name in enumerate(domains):
            if n_M[d] > 0:
                mean = float(loss_M[d] / n_M[d])
                out[keys.domain_loss(name, prefix)] = mean
                out[keys.domain_ppl(name, prefix)] = math.exp(min(mean, 80.0))
        return out


def routing_metrics(
    micro_batches: list[tuple[dict[int, RouterOutput], torch.Tensor, torch.Tensor | None]],
    num_experts: int,
    num_domains: int,
    prefix: str = keys.ROUTER,
) -> dict[str, float]:
    """Flat routing metrics over ALL micro-batches of one step: each item is
    ``(router_outputs {layer: RouterOutput}, mask_T, domain_T)``."""
    layers = sorted({i for outs, _, _ in micro_batches for i in outs})
    device = next(iter(micro_batches[0][0].values())).topk_indices.device if layers else "cpu"
    stats = LayerRoutingStats(layers, num_experts, num_domains, device)
    for outs, mask_T, domain_T in micro_batches:
        stats.add(outs, mask_T, domain_T)
    return stats.metrics(prefix)
