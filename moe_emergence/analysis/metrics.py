"""Specialisation metrics: one small function per formula, on numpy arrays.

Shapes (legend: docs/architecture.md): N tokens, K experts per token, E experts, M domains, Y token types,
V vocabulary (token ids), P flattened parameters of one expert, Z documents, Q bootstrap resamples.
``topk_NK`` holds expert indices ordered by decreasing router probability, so ``topk_NK[:, 0]`` is the top-1
expert. Logarithms are natural (nats); ``0 * log 0 = 0``.

Counting convention: "assignments" count every (token, chosen expert) pair, so with top-k each token
contributes k assignments; a table of assignments divided by the number of tokens sums to k per row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moe_emergence.telemetry import stats

# ----------------------------------------------------------------------------- counts and fractions


def tokens_per_expert(topk_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E]`` c_e = number of (token, slot) assignments to expert e."""
    return np.bincount(np.asarray(topk_NK).reshape(-1), minlength=num_experts).astype(np.float64)


def expert_usage(topk_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E]`` u_e = c_e / sum_j c_j: share of all routing assignments that went to expert e (sums to 1)."""
    c = tokens_per_expert(topk_NK, num_experts)
    return c / max(c.sum(), 1.0)


def joint_counts(
    labels_N: np.ndarray, experts_N: np.ndarray, num_labels: int, num_experts: int
) -> np.ndarray:
    """``[num_labels, E]`` n[l, e] = number of tokens with label l routed to expert e (labels: domains give
    ``[M, E]``, token types ``[Y, E]``, ...).

    ``experts_N`` may be ``[N]`` (one choice per token) or ``[N, K]`` (every top-k assignment counted).
    """
    labels_N = np.asarray(labels_N)
    experts = np.asarray(experts_N)
    if experts.ndim == 2:
        labels_N = np.repeat(labels_N, experts.shape[1])
        experts = experts.reshape(-1)
    flat = labels_N.astype(np.int64) * num_experts + experts.astype(np.int64)
    return (
        np.bincount(flat, minlength=num_labels * num_experts).reshape(num_labels, num_experts).astype(float)
    )


def row_fractions(counts_ME: np.ndarray) -> np.ndarray:
    """``[M, E]`` f[m, e] = n[m, e] / sum_e' n[m, e']: where domain m's assignments go (rows sum to 1; 0 rows
    stay 0). Any label x expert table works the same (token types: ``[Y, E]``)."""
    counts_ME = np.asarray(counts_ME, dtype=np.float64)
    return counts_ME / np.maximum(counts_ME.sum(1, keepdims=True), 1e-300)


# ----------------------------------------------------------------------------- information


def entropy(p: np.ndarray) -> float:
    """H(p) = -sum_i p_i ln p_i (nats) of a probability vector (normalised here if it is a count vector).
    The formula lives once, in ``moe_emergence.telemetry.stats.entropy``."""
    p = torch.as_tensor(np.asarray(p, dtype=np.float64).reshape(-1))
    total = float(p.sum())
    return stats.entropy(p / total) if total > 0 else 0.0


def mutual_information(counts_ME: np.ndarray) -> float:
    """I(domain; expert) = sum_{m,e} p(m,e) ln[p(m,e) / (p(m) p(e))] (nats) from a joint count table
    ``[M, E]`` (``moe_emergence.telemetry.stats.mutual_information``; clipped at 0 against rounding)."""
    return max(stats.mutual_information(torch.as_tensor(np.asarray(counts_ME, dtype=np.float64))), 0.0)


def information_measures(counts_ME: np.ndarray) -> dict[str, float]:
    """Mutual information and its normalisations from one contingency table ``[M, E]`` (domain x expert; any
    two labels work the same, e.g. two layers' expert choices ``[E, E]``). All in nats; the one owner of the
    normalisations below.

    ``mi_nats``: I(D; E) (``mutual_information``);
    ``nmi``: I / H(D), the share of the row label's uncertainty that the column label removes (Theil's
    uncertainty coefficient U(D | E); asymmetric; what this project reports as ``domain_nmi``);
    ``nmi_sqrt``: I / sqrt(H(D) H(E)) (Strehl & Ghosh, JMLR 2002; Vinh, Epps & Bailey, JMLR 2010: NMI_sqrt);
    ``nmi_arith``: I / ((H(D) + H(E)) / 2) (Vinh, Epps & Bailey 2010: NMI_sum, = the V-measure), scikit-learn's
    default ``normalized_mutual_info_score``.
    Each normalisation is in [0, 1] and 0 when its denominator is 0 (a single label: scikit-learn returns 1
    when BOTH labelings have a single class, 0 otherwise).
    """
    c = np.asarray(counts_ME, dtype=np.float64)
    mi = mutual_information(c)
    h_d, h_e = entropy(c.sum(1)), entropy(c.sum(0))

    def ratio(denominator: float) -> float:
        return min(mi / denominator, 1.0) if denominator > 0 else 0.0  # min: rounding of a perfect map

    return {
        "mi_nats": mi,
        "nmi": ratio(h_d),
        "nmi_sqrt": ratio(float(np.sqrt(h_d * h_e))),
        "nmi_arith": ratio((h_d + h_e) / 2),
    }


def normalized_mutual_information(counts_ME: np.ndarray) -> float:
    """NMI = I(domain; expert) / H(domain) in [0, 1]: the share of the domain's uncertainty that the expert
    choice removes (``information_measures["nmi"]``).

    1 when the expert determines the domain (e.g. a one-to-one map), 0 when they are independent;
    0 when there is a single domain (H(domain) = 0).
    """
    return information_measures(counts_ME)["nmi"]


def symmetric_nmi(counts_EE: np.ndarray) -> float:
    """NMI_sym = 2 I(a; b) / (H(a) + H(b)) in [0, 1] from the joint count table ``[E, E]`` of two variables of
    the same kind (two layers' expert choices a, b); 0 when both entropies are 0
    (``information_measures["nmi_arith"]``)."""
    return information_measures(counts_EE)["nmi_arith"]


def conditional_mutual_information(counts_XME: np.ndarray) -> float:
    """I(D; E | X) = sum_{x,d,e} p(x,d,e) ln[p(x) p(x,d,e) / (p(x,d) p(x,e))] in nats (Cover & Thomas,
    Elements of Information Theory, 2nd ed., sec. 2.5) from a count table ``[X, M, E]``: here token id x,
    domain d, expert e. Equals sum_x p(x) I(D; E | X = x), so it is 0 exactly when, within every token id,
    the expert is independent of the domain (in particular when the expert is a function of the token id),
    and at most H(D | X). Plug-in (maximum-likelihood) estimate: biased upward, by about
    (M - 1)(E - 1) / (2 N) per token id seen (Miller 1955), see docs/analysis.md. Clipped at 0 against
    rounding.
    """
    c = np.asarray(counts_XME, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    n_x = c.sum((1, 2), keepdims=True)
    n_xd = c.sum(2, keepdims=True)
    n_xe = c.sum(1, keepdims=True)
    ok = c > 0
    ratio = np.where(ok, n_x * c, 1.0) / np.where(ok, n_xd * n_xe, 1.0)
    return max(float((c[ok] * np.log(ratio[ok])).sum() / total), 0.0)


def cross_layer_nmi(top1_by_layer: dict[int, np.ndarray], num_experts: int) -> dict[tuple[int, int], float]:
    """For every pair of MoE layers (a < b): ``symmetric_nmi`` of the joint table of their top-1 choices.

    High: tokens that share an expert in layer a also share one in layer b (routing is consistent across
    depth); 0: the layers' choices are independent.
    """
    layers = sorted(top1_by_layer)
    out = {}
    for i, a in enumerate(layers):
        for b in layers[i + 1 :]:
            out[(a, b)] = symmetric_nmi(
                joint_counts(top1_by_layer[a], top1_by_layer[b], num_experts, num_experts)
            )
    return out


# ----------------------------------------------------------------------------- OLMoE specialisation


def domain_specialization(counts_ME: np.ndarray, tokens_M: np.ndarray) -> np.ndarray:
    """``[M, E]`` spec(e, D) = N_D(e) / N_D for each domain D (OLMoE's notation, Muennighoff et al. 2024).

    N_D(e): tokens of domain D that have e among their top-k experts (``counts_ME`` with every top-k
    assignment counted); N_D: tokens of domain D. Each row sums to k; uniform routing gives k / E
    everywhere (``uniform_baseline``), an expert that takes all of a domain's tokens gives 1.
    """
    return np.asarray(counts_ME, dtype=np.float64) / np.maximum(np.asarray(tokens_M, float)[:, None], 1e-300)


def uniform_baseline(top_k: int, num_experts: int) -> float:
    """k / E: the specialisation (and the assignment fraction times k) of every expert under uniform routing."""
    return top_k / num_experts


def vocabulary_specialization(
    token_ids_N: np.ndarray, topk_NK: np.ndarray, num_experts: int, min_count: int = 10
) -> tuple[float, int]:
    """(mean over token ids x with N_x >= min_count of max_e N_x(e) / N_x, number of such ids); the table
    ``counts_VE`` has a row per token id that occurs.

    N_x: occurrences of token id x; N_x(e): those that have e among their top-k. In [k/E, 1]: 1 when every
    occurrence of each frequent id goes to one expert (routing is a function of the token), k / E for
    uniform routing. NaN when no id is frequent enough.
    """
    ids = np.asarray(token_ids_N, dtype=np.int64)
    uniq, inv, n_x = np.unique(ids, return_inverse=True, return_counts=True)
    counts_VE = joint_counts(inv, topk_NK, len(uniq), num_experts)
    keep = n_x >= min_count
    if not keep.any():
        return float("nan"), 0
    return float((counts_VE[keep].max(1) / n_x[keep]).mean()), int(keep.sum())


# ----------------------------------------------------------------------------- dynamics and structure


def router_saturation(topk_a_NK: np.ndarray, topk_b_NK: np.ndarray) -> dict[str, float]:
    """How much routing changed between two checkpoints on the same tokens.

    ``same_set``: share of tokens whose top-k SET is identical (order ignored);
    ``overlap``: mean |S_a(t) ∩ S_b(t)| / k (OLMoE's router saturation when b is the final checkpoint).
    """
    a = np.sort(np.asarray(topk_a_NK), axis=1)
    b = np.sort(np.asarray(topk_b_NK), axis=1)
    if a.shape != b.shape:
        raise ValueError(f"router_saturation: top-k shapes differ, {a.shape} vs {b.shape}")
    same = (a == b).all(1).mean()
    overlap = (a[:, :, None] == b[:, None, :]).any(2).mean()
    return {"same_set": float(same), "overlap": float(overlap)}


def coactivation(topk_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` C[i, j] = P(j in top-k | i in top-k) = n(i and j) / n(i) for i != j, diagonal 0.

    Rows of experts that were never chosen are 0. With k = 1 the matrix is all zeros.
    """
    topk = np.asarray(topk_NK)
    onehot_NE = np.zeros((topk.shape[0], num_experts))
    np.put_along_axis(onehot_NE, topk, 1.0, axis=1)
    both_EE = onehot_NE.T @ onehot_NE
    n_E = np.diag(both_EE).copy()
    c = both_EE / np.maximum(n_E[:, None], 1e-300)
    np.fill_diagonal(c, 0.0)
    return c


def cosine_distance_matrix(weights_EP: np.ndarray) -> np.ndarray:
    """``[E, E]`` d[i, j] = 1 - cos(w_i, w_j) between flattened expert weights (0 for identical copies)."""
    w = np.asarray(weights_EP, dtype=np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-300)
    return 1.0 - w @ w.T


def mean_pairwise(d_EE: np.ndarray) -> float:
    """Mean of the strictly upper triangle of a pairwise matrix (0 for a single expert)."""
    i, j = np.triu_indices(d_EE.shape[0], k=1)
    return float(d_EE[i, j].mean()) if len(i) else 0.0


def distance_from_parent(weights_EP: np.ndarray, parent_P: np.ndarray) -> np.ndarray:
    """``[E]`` 1 - cos(w_e, w_parent): how far each expert moved from the dense MLP it was copied from."""
    w = np.asarray(weights_EP, dtype=np.float64)
    p = np.asarray(parent_P, dtype=np.float64)
    cos = (w @ p) / np.maximum(np.linalg.norm(w, axis=1) * np.linalg.norm(p), 1e-300)
    return 1.0 - cos


# ----------------------------------------------------------------------------- bootstrap over documents


def per_document_tables(
    doc_N: np.ndarray, labels_N: np.ndarray, values_N: np.ndarray, shape: tuple[int, int]
):
    """``[Z, *shape]`` per-document count tables n_z[a, b] (``labels_N`` indexes a, ``values_N`` b) and the
    ``[Z]`` document ids in row order. Any table-valued statistic is a function of their sum, so a
    bootstrap over documents only needs to re-weight these rows."""
    docs, doc_row = np.unique(np.asarray(doc_N), return_inverse=True)
    rows, cols = shape
    flat = (doc_row * rows + np.asarray(labels_N, np.int64)) * cols + np.asarray(values_N, np.int64)
    tables = np.bincount(flat, minlength=len(docs) * rows * cols).reshape(len(docs), rows, cols)
    return tables.astype(np.float64), docs


def per_document_sums(doc_N: np.ndarray, labels_N: np.ndarray, values: np.ndarray, num_labels: int):
    """``[Z, num_labels, columns]`` per-document sums s_z[a, c] = sum of ``values[t, c]`` (``[N, columns]``)
    over tokens t of document z with label a (e.g. columns [1, nll] give token counts and loss sums per
    domain), and the ``[Z]`` document ids."""
    docs, doc_row = np.unique(np.asarray(doc_N), return_inverse=True)
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros((len(docs), num_labels, values.shape[1]))
    np.add.at(out, (doc_row, np.asarray(labels_N, np.int64)), values)
    return out, docs


def bootstrap_ci(
    tables_Z: np.ndarray,
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    strata_Z: np.ndarray | None = None,
    level: float = 0.95,
) -> dict[str, float | list]:
    """Point estimate and percentile bootstrap CI of ``statistic(sum_z tables_Z[z])`` over DOCUMENTS.

    Each of the Q = ``n_boot`` replicates draws Z documents with replacement (within each stratum when
    ``strata_Z`` is given, so the number of documents per domain is kept) and evaluates the statistic on
    the re-weighted sum of their tables. CI = the (1-level)/2 and (1+level)/2 percentiles of the Q
    replicates. Tokens of one document are correlated, so resampling documents, not tokens, gives honest
    intervals. Seeded.
    """
    tables_Z = np.asarray(tables_Z, dtype=np.float64)
    Z = tables_Z.shape[0]
    point = np.asarray(statistic(tables_Z.sum(0)), dtype=np.float64)
    if n_boot <= 0 or Z == 0:
        nan = np.full_like(point, np.nan)
        return _ci_dict(point, nan, nan, 0)
    rng = np.random.default_rng(seed)
    strata = np.zeros(Z, np.int64) if strata_Z is None else np.asarray(strata_Z)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    flat = tables_Z.reshape(Z, -1)
    reps = []
    for _ in range(n_boot):
        w_Z = np.zeros(Z)
        for g in groups:
            w_Z[g] = np.bincount(rng.integers(0, len(g), len(g)), minlength=len(g))
        reps.append(np.asarray(statistic((w_Z @ flat).reshape(tables_Z.shape[1:])), dtype=np.float64))
    reps_Q = np.stack(reps)
    lo, hi = np.percentile(reps_Q, [100 * (1 - level) / 2, 100 * (1 + level) / 2], axis=0)
    return _ci_dict(point, lo, hi, n_boot)


def _ci_dict(point: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_boot: int) -> dict:
    conv = (lambda a: float(a)) if point.ndim == 0 else (lambda a: a.tolist())
    return {"value": conv(point), "ci_low": conv(lo), "ci_high": conv(hi), "n_boot": n_boot}
