import numpy as np
import pytest
from scipy import stats as sps

from segguided_jax.evaluation.stats import bootstrap_ci, mean_std, paired_wilcoxon


def test_mean_std_known_values():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_paired_wilcoxon_matches_scipy_and_pairs_by_case():
    x = [0.91, 0.85, 0.88, 0.93, 0.79, 0.90, 0.87, 0.84]
    y = [0.89, 0.86, 0.80, 0.90, 0.75, 0.88, 0.81, 0.85]
    a = {f"c{i}": v for i, v in enumerate(x)}
    b = {f"c{i}": v for i, v in reversed(list(enumerate(y)))}  # order must not matter
    b["only_in_b"] = 0.1  # unpaired cases are left out
    r = paired_wilcoxon(a, b)
    ref = sps.wilcoxon(x, y)
    assert r["n"] == 8 and "only_in_b" not in r["cases"]
    assert r["statistic"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    # Known value: differences 0.02, -0.01, 0.08, 0.03, 0.04, 0.02, 0.06, -0.01 -> W = min(W+, W-)
    # = 3 (the two -0.01 share ranks 1.5 and 1.5), exact two-sided p = 0.0234 by scipy's tables.
    assert r["statistic"] == pytest.approx(3.0)
    assert 0.01 < r["p_value"] < 0.05
    assert np.isnan(paired_wilcoxon({"a": 1.0}, {"a": 1.0})["p_value"])


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    hits, trials = 0, 300
    for t in range(trials):
        sample = rng.normal(5.0, 2.0, 40)
        lo, hi = bootstrap_ci(sample, resamples=2000, seed=t)
        hits += lo <= 5.0 <= hi
    assert 0.90 <= hits / trials <= 0.98  # percentile bootstrap at n = 40 under-covers slightly
    assert bootstrap_ci([1.0, 2.0, 3.0], seed=1) == bootstrap_ci([1.0, 2.0, 3.0], seed=1)
