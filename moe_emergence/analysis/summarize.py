"""Turn collected routing (and a model's weights) into the numbers of metrics.json, with bootstrap CIs.

Shapes (legend: docs/architecture.md): N tokens, K experts per token, E experts, M domains, Y token types,
Z documents, P flattened parameters of one expert, B rows (eval blocks), S positions.
Everything returned is plain JSON (floats, lists, dicts with string keys).
"""

from __future__ import annotations

import numpy as np
import torch

from moe_emergence.analysis import domain_summary as ds
from moe_emergence.analysis import metrics as m
from moe_emergence.analysis.collect import TOKEN_TYPES, Routing


def loss_by_domain(routing: Routing, n_boot: int, seed: int) -> dict:
    """Token-weighted mean next-token loss per domain (and ``all``) with document-bootstrap CIs; also ppl."""
    ok = ~np.isnan(routing.nll)
    M = len(routing.domains)
    vals = np.stack([np.ones(ok.sum()), routing.nll[ok]], 1)
    tables, docs = m.per_document_sums(routing.doc[ok], routing.domain[ok], vals, M)

    def stat(t_M2: np.ndarray) -> np.ndarray:
        per = t_M2[:, 1] / np.maximum(t_M2[:, 0], 1e-300)
        return np.append(per, t_M2[:, 1].sum() / max(t_M2[:, 0].sum(), 1e-300))

    ci = m.bootstrap_ci(tables, stat, n_boot, seed, strata_Z=routing.domain_of(docs))
    out = {}
    for i, name in enumerate([*routing.domains, "all"]):
        out[name] = {k: (v[i] if isinstance(v, list) else v) for k, v in ci.items()}
        out[name]["ppl"] = float(np.exp(out[name]["value"]))
    return out


def layer_summary(
    routing: Routing,
    layer: int,
    n_boot: int,
    seed: int,
    min_count: int = 10,
    n_perm: int = 1000,
    routing0: Routing | None = None,
) -> dict:
    """Every routing metric of one MoE layer (see ``metrics`` and ``domain_summary`` for the formulas);
    ``step0`` compares with the step-0 router's routing ``routing0`` on the same tokens (None without it)."""
    E, K, M = routing.num_experts, routing.top_k, len(routing.domains)
    topk_NK = routing.topk[layer]
    probs_NE = routing.probs[layer]
    counts_ME = m.joint_counts(routing.domain, topk_NK, M, E)
    tokens_M = np.bincount(routing.domain, minlength=M).astype(float)
    usage = m.expert_usage(topk_NK, E)

    spec = m.domain_specialization(counts_ME, tokens_M)
    vocab, n_ids = m.vocabulary_specialization(routing.token_ids, topk_NK, E, min_count)
    out = {
        "num_experts": E,
        "top_k": K,
        "uniform_baseline": m.uniform_baseline(K, E),
        "expert_usage": usage.tolist(),
        "max_frac": float(usage.max()),
        "dead_experts": int((usage == 0).sum()),
        "mean_token_entropy": float(-(probs_NE * np.log(np.clip(probs_NE, 1e-30, None))).sum(1).mean()),
        "marginal_entropy": m.entropy(probs_NE.mean(0)),
        "domain_expert_counts": counts_ME.tolist(),
        "domain_expert_fractions": m.row_fractions(counts_ME).tolist(),
        **ds.domain_information(routing, layer, n_boot, seed),
        **ds.null_baselines(routing, layer, n_boot, n_perm, seed, min_count),
        "step0": ds.step0_change(routing, routing0, layer, n_boot, seed) if routing0 is not None else None,
        "domain_specialization": spec.tolist(),
        "max_specialization": {d: float(spec[i].max()) for i, d in enumerate(routing.domains)},
        "top_expert": {d: int(spec[i].argmax()) for i, d in enumerate(routing.domains)},
        "vocab_specialization": {"value": vocab, "num_token_ids": n_ids, "min_count": min_count},
        "coactivation": m.coactivation(topk_NK, E).tolist() if K > 1 else None,
    }
    code = routing.token_type >= 0
    if code.any():
        counts_YE = m.joint_counts(routing.token_type[code], topk_NK[code], len(TOKEN_TYPES), E)
        out["token_type_counts"] = counts_YE.tolist()
        out["token_type_fractions"] = m.row_fractions(counts_YE).tolist()
        t_tables, t_docs = m.per_document_tables(
            routing.doc[code], routing.token_type[code], topk_NK[code][:, 0], (len(TOKEN_TYPES), E)
        )
        out["token_type_nmi"] = m.bootstrap_ci(t_tables, m.normalized_mutual_information, n_boot, seed)
    return out


def routing_summary(
    routing: Routing, n_boot: int = 1000, seed: int = 0, n_perm: int = 1000, routing0: Routing | None = None
) -> dict:
    """metrics.json section of one model on one eval set; ``routing0``: the step-0 router's routing of the
    same eval set (MoE runs whose parent is known), None otherwise."""
    docs, doc_dom = routing.doc_domain
    M = len(routing.domains)
    out = {
        "domains": routing.domains,
        "tokens": dict(zip(routing.domains, np.bincount(routing.domain, minlength=M).tolist(), strict=True)),
        "documents": dict(zip(routing.domains, np.bincount(doc_dom, minlength=M).tolist(), strict=True)),
        "loss": loss_by_domain(routing, n_boot, seed),
        "is_moe": bool(routing.topk),
    }
    if routing.topk:
        out["token_types"] = list(TOKEN_TYPES)
        code = routing.token_type >= 0
        out["code_token_type_counts"] = dict(
            zip(
                TOKEN_TYPES,
                np.bincount(routing.token_type[code], minlength=len(TOKEN_TYPES)).tolist(),
                strict=True,
            )
        )
        out["layers"] = {
            str(L): layer_summary(routing, L, n_boot, seed, n_perm=n_perm, routing0=routing0)
            for L in routing.layers
        }
        out["step0_known"] = routing0 is not None
        top1 = {L: routing.topk[L][:, 0] for L in routing.layers}
        out["cross_layer_nmi"] = {
            f"{a}-{b}": v for (a, b), v in m.cross_layer_nmi(top1, routing.num_experts).items()
        }
    return out


def ablation_summary(ablation: dict, routing: Routing, n_boot: int, seed: int) -> dict:
    """Per layer, expert and domain: ablated loss, delta vs base, and a document-bootstrap CI of the delta."""
    M = len(routing.domains)
    base_ok = ~np.isnan(routing.nll)
    out = {"base": ablation["base"], "layers": {}}
    for layer, res in ablation["layers"].items():
        per_e = []
        for e, nll_BS in res["nll"].items():
            abl_N = _flat_like(nll_BS, routing)
            ok = base_ok & ~np.isnan(abl_N)
            vals = np.stack([np.ones(ok.sum()), abl_N[ok] - routing.nll[ok]], 1)
            tables, docs = m.per_document_sums(routing.doc[ok], routing.domain[ok], vals, M)
            ci = m.bootstrap_ci(
                tables,
                lambda t: t[:, 1] / np.maximum(t[:, 0], 1e-300),
                n_boot,
                seed,
                routing.domain_of(docs),
            )
            per_e.append(
                {
                    "loss": dict(zip(routing.domains, res["loss"][e], strict=True)),
                    "delta": {
                        d: {"value": ci["value"][i], "ci_low": ci["ci_low"][i], "ci_high": ci["ci_high"][i]}
                        for i, d in enumerate(routing.domains)
                    },
                }
            )
        out["layers"][str(layer)] = per_e
    return out


def _flat_like(x_BS: np.ndarray, routing: Routing) -> np.ndarray:
    return x_BS[routing.block, routing.pos]


def expert_weights(model) -> dict[int, np.ndarray]:
    """``{layer: [E, P]}`` every parameter of each expert (w1, b1, w2, b2) flattened and concatenated."""
    out = {}
    for layer, wrapper in model.moe_layers().items():
        ex = wrapper.experts
        E = ex.w1_EDF.shape[0]
        parts = [ex.w1_EDF, ex.b1_EF, ex.w2_EFD, ex.b2_ED]
        out[layer] = torch.cat([p.detach().float().reshape(E, -1).cpu() for p in parts], 1).numpy()
    return out


def dense_mlp_weights(dense_model, layers: list[int]) -> dict[int, np.ndarray]:
    """``{layer: [P]}`` a dense GPT-2 MLP flattened in the expert layout (c_fc W, b, c_proj W, b)."""
    out = {}
    for layer in layers:
        mlp = dense_model.transformer.h[layer].mlp
        parts = [mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]
        out[layer] = torch.cat([p.detach().float().reshape(-1).cpu() for p in parts]).numpy()
    return out


def weight_summary(model, parent=None) -> dict:
    """Per MoE layer: pairwise cosine distances between experts (matrix and mean) and, when the dense
    parent is known, each expert's cosine distance from the parent MLP."""
    weights = expert_weights(model)
    parent_w = dense_mlp_weights(parent, list(weights)) if parent is not None else {}
    out = {}
    for layer, w_EP in weights.items():
        d_EE = m.cosine_distance_matrix(w_EP)
        out[str(layer)] = {
            "pairwise_cosine_distance": d_EE.tolist(),
            "mean_pairwise_cosine_distance": m.mean_pairwise(d_EE),
            "distance_from_parent": m.distance_from_parent(w_EP, parent_w[layer]).tolist()
            if layer in parent_w
            else None,
        }
    return out
