"""Statistics over independent runs (seeds): mean with a Student-t 95% confidence interval, the paired
version for runs that share a seed (same data order), e.g. an MoE run minus its dense control, and an exact
sign-flip permutation test of the paired differences.

For n runs with values x_i: mean m, sample standard deviation s (ddof 1), CI = m +- t_{0.975, n-1} s / sqrt(n).
The t quantiles are tabulated (no scipy dependency) for n - 1 = 1..30; beyond that the normal 1.96 is used
(t_{0.975, 30} = 2.042, so the error of that is below 4%).

Sign-flip test (Fisher 1935, the randomisation test for paired data; Good, Permutation Tests, 2005): under
H0 each paired difference d_i is symmetric about 0, so all 2^n sign patterns s of the d_i are equally likely;
p = #{s : |sum_i s_i d_i| >= |sum_i d_i|} / 2^n, exact, no normality assumed. Its smallest value is 2 / 2^n:
0.25 for 3 seeds, 0.0625 for 5, 0.031 for 6, so p < 0.05 needs at least 6 seeds.
"""

from __future__ import annotations

import math

import numpy as np

# t_{0.975, df} for df = 1..30 (two-sided 95%), standard tables.
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values) -> dict:
    """``{"value", "ci_low", "ci_high", "n"}`` of the mean over runs; the CI is NaN for a single run."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci: no values")
    m = float(x.mean())
    if x.size == 1:
        return {"value": m, "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"value": m, "ci_low": m - half, "ci_high": m + half, "n": int(x.size)}


def paired_diff_ci(a: dict, b: dict) -> dict:
    """Mean and CI of ``a[seed] - b[seed]`` over the seeds both dicts have (at least one)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"paired_diff_ci: no common seed between {sorted(a)} and {sorted(b)}")
    return mean_ci(a[s] - b[s] for s in seeds)


def sign_flip_test(diffs) -> dict:
    """Exact two-sided sign-flip permutation test of mean(diffs) = 0 (module docstring): ``{"p_value",
    "n", "n_flips"}`` over all 2^n sign patterns (n <= 20). ``diffs``: paired differences, one per seed."""
    d = np.asarray(list(diffs), dtype=np.float64)
    n = d.size
    if not 1 <= n <= 20:
        raise ValueError(f"sign_flip_test: needs 1..20 paired differences (exact enumeration), got {n}")
    if not np.isfinite(d).all():
        raise ValueError(f"sign_flip_test: the differences must be finite numbers, got {d.tolist()}")
    sums = np.zeros(1)
    for x in d:  # the signed sums of every sign pattern, 2^n floats
        sums = np.concatenate([sums + x, sums - x])
    observed = abs(d.sum())
    extreme = np.abs(sums) >= observed - 1e-12 * max(observed, 1.0)
    return {"p_value": float(extreme.mean()), "n": int(n), "n_flips": int(2**n)}


def paired_test(a: dict, b: dict) -> dict:
    """``paired_diff_ci(a, b)`` with the sign-flip p-value of the same differences (key ``p_value``)."""
    seeds = sorted(set(a) & set(b))
    out = paired_diff_ci(a, b)
    out["p_value"] = sign_flip_test(a[s] - b[s] for s in seeds)["p_value"]
    return out
