"""Statistics for seed sweeps and ablations: spread over seeds, bootstrap confidence intervals
over cases, and paired Wilcoxon signed-rank tests between settings."""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def bootstrap_ci(values, *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (resampling cases with
    replacement), reproducible from `seed`."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (resamples, v.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_wilcoxon(a: dict, b: dict) -> dict:
    """Two-sided Wilcoxon signed-rank test of per-case values a[case] vs b[case], paired by case
    id over the cases both have. Returns {"n", "cases", "statistic", "p_value", "median_diff"}
    (statistic and p_value are NaN when fewer than 2 cases or every difference is zero)."""
    cases = sorted(set(a) & set(b))
    x = np.array([a[c] for c in cases], np.float64)
    y = np.array([b[c] for c in cases], np.float64)
    out = {"n": len(cases), "cases": cases, "median_diff": float(np.median(x - y)) if cases else float("nan"),
           "statistic": float("nan"), "p_value": float("nan")}
    if len(cases) >= 2 and np.any(x != y):
        res = sps.wilcoxon(x, y, alternative="two-sided")
        out["statistic"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out
