"""Null baselines for domain-expert statistics: what a number would be without domain-specific routing.

Shapes (legend: docs/architecture.md): N tokens, E experts, M domains, Z documents, Q permutations.

- ``document_permutation_null``: the domain labels shuffled across documents (each document's tokens stay
  together, so the correlation of routing within a document is kept); any statistic recomputed per
  permutation. Its mean is what the statistic gives when routing carries no domain information beyond
  document clustering and finite samples; the p-value is the permutation test of "no domain information".
- ``token_identity_experts``: a router that looks only at the token id (each id to the expert the model
  sent it to most often), fitted on one half of the documents and applied to the other (2-fold
  cross-fitting), so its NMI measures how much domain signal routing by token id alone would carry.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def document_folds(domain_Z: np.ndarray) -> np.ndarray:
    """``[Z]`` fold (0 or 1) of each document: alternating in document order within each domain, so both
    folds hold half of every domain's documents (deterministic; with an odd count fold 0 has one more)."""
    domain_Z = np.asarray(domain_Z)
    fold = np.zeros(len(domain_Z), dtype=np.int64)
    for d in np.unique(domain_Z):
        idx = np.flatnonzero(domain_Z == d)
        fold[idx] = np.arange(len(idx)) % 2
    return fold


def token_identity_experts(
    token_ids_N: np.ndarray, experts_N: np.ndarray, fold_N: np.ndarray, num_experts: int
) -> tuple[np.ndarray, float]:
    """(``[N]`` the token-identity router's expert for each token, share of tokens whose id the other fold
    has). 2-fold cross-fitting: a token of fold f gets argmax_e n_{1-f}(x, e), the expert that tokens with
    its id x were routed to most often in the OTHER fold (ties: the lowest expert index); an id the other
    fold never has gets that fold's most used expert (a constant: no domain information).

    ``experts_N``: the model's choice per token (e.g. top-1); ``fold_N``: 0/1 per token (all tokens of a
    document in one fold, ``document_folds``). Fitting and scoring on the same tokens would let rare ids
    memorise their document's expert and overstate the baseline.
    """
    ids = np.asarray(token_ids_N, dtype=np.int64)
    experts_N = np.asarray(experts_N, dtype=np.int64)
    fold_N = np.asarray(fold_N, dtype=np.int64)
    uniq, x_N = np.unique(ids, return_inverse=True)
    out = np.zeros(len(ids), dtype=np.int64)
    seen = np.zeros(len(ids), dtype=bool)
    for f in (0, 1):
        fit, apply = fold_N != f, fold_N == f
        counts_XE = np.bincount(
            x_N[fit] * num_experts + experts_N[fit], minlength=len(uniq) * num_experts
        ).reshape(len(uniq), num_experts)
        has_X = counts_XE.sum(1) > 0
        fallback = int(counts_XE.sum(0).argmax())
        best_X = np.where(has_X, counts_XE.argmax(1), fallback)
        out[apply] = best_X[x_N[apply]]
        seen[apply] = has_X[x_N[apply]]
    return out, float(seen.mean()) if len(ids) else 0.0


def document_permutation_null(
    domain_Z: np.ndarray,
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n_perm: int = 1000,
    seed: int = 0,
) -> dict:
    """Permutation null of ``statistic(domain_Z)``, a statistic of the documents' domain labels ``[Z]``
    (e.g. an NMI computed from per-document expert counts), under Q = ``n_perm`` random permutations of
    the labels across ALL documents (the number of documents per domain is kept; tokens of a document
    move together). Seeded.

    Returns ``{"observed", "mean", "p95", "p_value", "n_perm"}`` (lists for a vector statistic): the
    statistic on the true labels, the mean and 95th percentile of the Q permuted values, and the one-sided
    p-value (1 + #{null >= observed}) / (1 + Q) (Phipson & Smyth 2010: never 0). NaN without permutations.
    """
    domain_Z = np.asarray(domain_Z)
    observed = np.asarray(statistic(domain_Z), dtype=np.float64)
    if n_perm <= 0:
        nan = np.full_like(observed, np.nan)
        return _null_dict(observed, nan, nan, nan, 0)
    rng = np.random.default_rng(seed)
    null_Q = np.stack(
        [np.asarray(statistic(rng.permutation(domain_Z)), dtype=np.float64) for _ in range(n_perm)]
    )
    tol = 1e-12 * np.maximum(np.abs(observed), 1.0)  # a permutation that reproduces the labels counts
    p = np.where(np.isnan(observed), np.nan, (1 + (null_Q >= observed - tol).sum(0)) / (1 + n_perm))
    return _null_dict(observed, null_Q.mean(0), np.percentile(null_Q, 95, axis=0), p, n_perm)


def _null_dict(observed, mean, p95, p, n_perm: int) -> dict:
    conv = (lambda a: float(a)) if np.ndim(observed) == 0 else (lambda a: np.asarray(a).tolist())
    return {
        "observed": conv(observed),
        "mean": conv(mean),
        "p95": conv(p95),
        "p_value": conv(p),
        "n_perm": n_perm,
    }
