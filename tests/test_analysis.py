"""analysis.stats: intervals that match lm-eval and detect (only) real differences."""

import math

import numpy as np
import pytest
from lm_eval.api.metrics import mean_stderr as lm_mean_stderr

from analysis import stats


def test_mean_stderr_equals_lm_eval():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2, size=57).astype(float).tolist()
    mean, se = stats.mean_stderr(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(lm_mean_stderr(values), rel=1e-12)


def test_normal_interval_is_mean_plus_minus_1_96_stderr():
    lo, hi = stats.normal_interval(0.5, 0.1)
    assert lo == pytest.approx(0.5 - 0.195996, abs=1e-5)
    assert hi == pytest.approx(0.5 + 0.195996, abs=1e-5)


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 1.0, size=400)  # shared per-item difficulty: pairing removes it
    a = base + 0.3 + rng.normal(0, 0.1, size=400)
    b = base + rng.normal(0, 0.1, size=400)
    res = stats.paired_bootstrap(a, b, seed=0)
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert res["lo"] < 0.3 < res["hi"]
    assert stats.distinguishable(res["lo"], res["hi"])


def test_paired_bootstrap_reports_null_difference_indistinguishable():
    rng = np.random.default_rng(2)
    base = rng.normal(2.0, 1.0, size=300)
    a = base + rng.normal(0, 0.2, size=300)
    b = base + rng.normal(0, 0.2, size=300)
    res = stats.paired_bootstrap(a, b, seed=0)
    assert res["lo"] < 0 < res["hi"]
    assert not stats.distinguishable(res["lo"], res["hi"])


def test_paired_bootstrap_weights_give_token_weighted_means():
    a, b, w = [1.0, 3.0], [2.0, 2.0], [3, 1]
    res = stats.paired_bootstrap(a, b, weights=w, n_boot=50)
    assert res["diff"] == pytest.approx((1 * 3 + 3 * 1) / 4 - 2.0)


def test_seed_difference_is_welch_interval():
    from scipy import stats as sst
    xs, ys = [1.0, 1.2, 0.9, 1.1], [0.5, 0.7, 0.6]
    res = stats.seed_difference(xs, ys)
    ref = sst.ttest_ind(xs, ys, equal_var=False).confidence_interval(0.95)
    assert res["diff"] == pytest.approx(np.mean(xs) - np.mean(ys))
    assert (res["lo"], res["hi"]) == pytest.approx((ref.low, ref.high))


def test_seed_difference_with_one_seed_is_unknown_not_distinguishable():
    res = stats.seed_difference([1.0], [0.0, 0.1])
    assert math.isnan(res["lo"]) and not stats.distinguishable(res["lo"], res["hi"])


def test_t_quantile_fallback_matches_scipy(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert stats.t_quantile(0.975, 4.0) == pytest.approx(2.776445, abs=1e-4)
