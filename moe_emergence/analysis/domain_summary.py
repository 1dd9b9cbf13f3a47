"""Domain-expert information of one MoE layer for metrics.json: MI and its normalisations with bootstrap CIs,
the null baselines (shuffled domains, a token-identity router, I(domain; expert | token id)) and the
change from the step-0 router. Formulas: ``metrics`` and ``baselines``; what each key means: docs/analysis.md.

Shapes (legend: docs/architecture.md): N tokens, K experts per token, E experts, M domains, Z documents,
X token ids kept (seen at least ``min_count`` times), R distinct (document, token id, expert) triples.
"""

from __future__ import annotations

import numpy as np

from moe_emergence.analysis import baselines as b
from moe_emergence.analysis import metrics as m
from moe_emergence.analysis.collect import Routing

MEASURES = ("mi_nats", "nmi", "nmi_sqrt", "nmi_arith")  # keys of metrics.information_measures


def _component(ci: dict, i: int) -> dict:
    """Entry ``i`` of a vector-valued ``bootstrap_ci`` / ``document_permutation_null`` result."""
    return {k: (v[i] if isinstance(v, list) else v) for k, v in ci.items()}


def _all_choice_tables(routing: Routing, topk_NK: np.ndarray, M: int, E: int):
    """Per-document ``[Z, M, E]`` tables counting every top-k assignment, and the ``[Z]`` document ids."""
    K = topk_NK.shape[1]
    return m.per_document_tables(
        np.repeat(routing.doc, K), np.repeat(routing.domain, K), topk_NK.reshape(-1), (M, E)
    )


def domain_information(routing: Routing, layer: int, n_boot: int, seed: int) -> dict:
    """``domain_mi_nats``, ``domain_nmi``, ``domain_nmi_sqrt``, ``domain_nmi_arith`` of domain and FIRST-choice
    expert (one bootstrap, the same resamples for all four), and ``domain_nmi_topk``: I / H(D) over every
    top-k assignment (both choices with top-2; equal to ``domain_nmi`` for top-1). Each a CI dict
    (``metrics.bootstrap_ci``, documents resampled within each domain)."""
    M, E = len(routing.domains), routing.num_experts
    topk_NK = routing.topk[layer]
    tables, docs = m.per_document_tables(routing.doc, routing.domain, topk_NK[:, 0], (M, E))
    strata = routing.domain_of(docs)

    def measures(t_ME: np.ndarray) -> list[float]:
        info = m.information_measures(t_ME)
        return [info[k] for k in MEASURES]

    ci = m.bootstrap_ci(tables, measures, n_boot, seed, strata)
    out = {f"domain_{k}": _component(ci, i) for i, k in enumerate(MEASURES)}
    all_tables, _ = _all_choice_tables(routing, topk_NK, M, E)
    out["domain_nmi_topk"] = m.bootstrap_ci(all_tables, m.normalized_mutual_information, n_boot, seed, strata)
    return out


def _cmi_rows(routing: Routing, top1_N: np.ndarray, doc_row_N: np.ndarray, min_count: int):
    """Distinct (document row, kept token id, expert) triples with their counts, the number of kept ids X and
    the share of tokens kept: the sufficient data for I(D; E | X) under any document -> domain labelling."""
    _, x_N, n_x = np.unique(routing.token_ids, return_inverse=True, return_counts=True)
    keep_X = n_x >= min_count
    new_x = np.cumsum(keep_X) - 1  # kept ids renumbered 0..X-1
    keep_N = keep_X[x_N]
    X, E = int(keep_X.sum()), routing.num_experts
    if X == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0), 0, 0.0
    key = (doc_row_N[keep_N] * X + new_x[x_N[keep_N]]) * E + top1_N[keep_N]
    rows, w_R = np.unique(key, return_counts=True)
    doc_R, x_R, e_R = rows // (X * E), (rows // E) % X, rows % E
    return doc_R, x_R, e_R, w_R.astype(np.float64), X, float(keep_N.mean()) if len(keep_N) else 0.0


def null_baselines(routing: Routing, layer: int, n_boot: int, n_perm: int, seed: int, min_count: int) -> dict:
    """``null_permutation`` (document-label shuffles of domain_nmi, domain_nmi_topk, domain_cmi_given_token),
    ``token_identity_nmi`` (CI dict + ``seen_frac``) and ``domain_cmi_given_token`` of one layer."""
    M, E = len(routing.domains), routing.num_experts
    topk_NK = routing.topk[layer]
    top1_N = topk_NK[:, 0]
    docs, domain_Z = routing.doc_domain
    doc_row_N = np.searchsorted(docs, routing.doc)
    K = topk_NK.shape[1]
    first_ZE, all_ZE = (
        np.bincount(z * E + e, minlength=len(docs) * E).reshape(-1, E).astype(float)
        for z, e in ((doc_row_N, top1_N), (np.repeat(doc_row_N, K), topk_NK.reshape(-1)))
    )
    doc_R, x_R, e_R, w_R, X, token_frac = _cmi_rows(routing, top1_N, doc_row_N, min_count)

    def cmi(dom_Z: np.ndarray) -> float:
        if X == 0:
            return float("nan")
        flat = (x_R * M + dom_Z[doc_R]) * E + e_R
        return m.conditional_mutual_information(np.bincount(flat, w_R, X * M * E).reshape(X, M, E))

    def statistic(dom_Z: np.ndarray) -> list[float]:
        onehot_ZM = np.eye(M)[dom_Z]
        nmi = [m.normalized_mutual_information(onehot_ZM.T @ t) for t in (first_ZE, all_ZE)]
        return [*nmi, cmi(dom_Z)]

    null = b.document_permutation_null(domain_Z, statistic, n_perm, seed)
    names = ("domain_nmi", "domain_nmi_topk", "domain_cmi_given_token")
    null_out = {"n_perm": n_perm, "seed": seed}
    for i, k in enumerate(names):
        null_out[k] = {key: v for key, v in _component(null, i).items() if key != "n_perm"}
    fold_N = b.document_folds(domain_Z)[doc_row_N]
    base_N, seen = b.token_identity_experts(routing.token_ids, top1_N, fold_N, E)
    tables, t_docs = m.per_document_tables(routing.doc, routing.domain, base_N, (M, E))
    ident = m.bootstrap_ci(tables, m.normalized_mutual_information, n_boot, seed, routing.domain_of(t_docs))
    cmi_value = null["observed"][2]
    h_given = _conditional_domain_entropy(doc_R, x_R, w_R, domain_Z, X, M)
    return {
        "null_permutation": null_out,
        "token_identity_nmi": {**ident, "seen_frac": seen, "fit": "2-fold cross-fitted over documents"},
        "domain_cmi_given_token": {
            "value": cmi_value,
            "excess_over_null": cmi_value - null["mean"][2] if n_perm > 0 else float("nan"),
            "h_domain_given_token": h_given,
            "min_count": min_count,
            "num_token_ids": X,
            "token_frac": token_frac,
        },
    }


def _conditional_domain_entropy(doc_R, x_R, w_R, domain_Z, X: int, M: int) -> float:
    """H(D | X) = H(D) - I(D; X) in nats over the kept tokens: the most I(D; E | X) can be."""
    counts_XM = np.bincount(x_R * M + domain_Z[doc_R], w_R, X * M).reshape(X, M)
    return max(m.entropy(counts_XM.sum(0)) - m.mutual_information(counts_XM), 0.0)


def step0_change(routing: Routing, routing0: Routing, layer: int, n_boot: int, seed: int) -> dict:
    """The step-0 router's ``domain_nmi`` and ``domain_nmi_topk`` on the same tokens, and the change of each
    (final - step 0), with paired document-bootstrap CIs (the same resampled documents for both models)."""
    if not np.array_equal(routing.token_ids, routing0.token_ids):
        raise ValueError("step0_change: the two routings are not on the same eval tokens")
    M, E = len(routing.domains), routing.num_experts
    out = {}
    for suffix, tables_of in (
        ("", lambda r: m.per_document_tables(r.doc, r.domain, r.topk[layer][:, 0], (M, E))),
        ("_topk", lambda r: _all_choice_tables(r, r.topk[layer], M, E)),
    ):
        (t1, docs), (t0, _) = tables_of(routing), tables_of(routing0)
        both = np.stack([t1, t0], 1)  # [Z, 2, M, E]

        def stat(t: np.ndarray) -> list[float]:
            n1, n0 = m.normalized_mutual_information(t[0]), m.normalized_mutual_information(t[1])
            return [n0, n1 - n0]

        ci = m.bootstrap_ci(both, stat, n_boot, seed, routing.domain_of(docs))
        out[f"domain_nmi{suffix}"] = _component(ci, 0)
        out[f"change_domain_nmi{suffix}"] = _component(ci, 1)
    return out
