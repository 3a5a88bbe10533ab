"""Intervals and differences for the report: plain numpy (scipy used when present).

Conventions follow lm-evaluation-harness so that a stderr printed here equals the one logged by
the evaluators: stderr = sample standard deviation (n-1) / sqrt(n).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "LEVEL",
    "mean_stderr",
    "stderr",
    "with_stderr",
    "normal_interval",
    "wilson_interval",
    "is_proportion",
    "item_interval",
    "MIN_GROUP_ITEMS",
    "paired_bootstrap",
    "seed_difference",
    "distinguishable",
    "t_quantile",
]

LEVEL = 0.95  # every interval the product prints, unless a caller asks for another
# a benchmark's category (MMLU's stem, humanities, ...) of fewer items is not reported on its
# own: at 9 items a 95 % Wilson interval around 0.5 spans more than half of [0, 1]
MIN_GROUP_ITEMS = 10


def mean_stderr(values) -> tuple[float, float]:
    """(mean, stderr) with lm-eval's stderr; stderr is nan for fewer than two values.

    Computed as ``lm_eval.api.metrics.mean_stderr`` does, in plain Python (left-to-right sums):
    the evaluators log this stderr, so a value recomputed here equals the logged one bit for bit.
    """
    values = values if isinstance(values, np.ndarray) else list(values)  # a generator too
    xs = np.asarray(values, dtype=float).ravel().tolist()
    if not xs:
        return math.nan, math.nan
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, math.nan
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def stderr(values) -> float:
    """lm-eval's ``mean_stderr``: the standard error alone (nan for fewer than two values)."""
    return mean_stderr(values)[1]


def with_stderr(name: str, values) -> dict[str, float]:
    """``{name: mean, name_stderr: stderr}`` over per-item ``values`` (lm-eval's naming)."""
    mean, se = mean_stderr(values)
    return {name: mean, f"{name}_stderr": se}


def _z(level: float) -> float:
    _check_level(level)
    return NormalDist().inv_cdf(0.5 + level / 2)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def normal_interval(mean: float, stderr: float, level: float = LEVEL) -> tuple[float, float]:
    """mean ± z·stderr (the interval lm-eval's stderr implies)."""
    half = _z(level) * stderr
    return mean - half, mean + half


def wilson_interval(p: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` items: inside [0, 1], of
    non-zero width at 0 and 1, and close to the normal interval when n·p·(1−p) is large (a
    mean of 0/1 items on a handful of items needs it: 1 of 4 gives [0.046, 0.699], where
    p ± z·stderr gives [-0.240, 0.740])."""
    if n <= 0 or p is None or math.isnan(p):
        return math.nan, math.nan
    z = _z(level)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def is_proportion(values) -> bool:
    """True when every per-item value is 0 or 1 (an accuracy, an exact match)."""
    xs = np.asarray(values if values is not None else [], dtype=float).ravel()
    return xs.size > 0 and bool(np.all((xs == 0) | (xs == 1)))


def item_interval(mean: float, stderr: float, items=None, level: float = LEVEL) -> tuple[float, float]:
    """The interval of a metric that is a mean over ``items`` (its per-item values, when
    known): Wilson for a mean of 0/1 items (a proportion), else mean ± z·stderr (the
    evaluator's lm-eval stderr; nan without one)."""
    if items is not None and is_proportion(items):
        return wilson_interval(mean, int(np.asarray(items).size), level)
    if stderr is None or math.isnan(stderr):
        return math.nan, math.nan
    return normal_interval(mean, stderr, level)


def _weighted_mean(x: np.ndarray, w: np.ndarray) -> float:
    return float((x * w).sum() / w.sum())


def paired_bootstrap(a, b, weights=None, n_boot: int = 2000, seed: int = 0,
                     level: float = LEVEL) -> dict:
    """diff = mean(a) - mean(b) over paired items, with a percentile bootstrap interval.

    a[i] and b[i] are the same item scored by two runs; items are resampled together so the
    interval reflects the paired difference, not two independent means. With `weights` (e.g.
    token counts for a token-weighted held-out loss) both means are weighted by them.
    """
    _check_level(level)
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: a and b differ in length ({a.size} vs {b.size})")
    n = a.size
    if n == 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.shape != a.shape:
        raise ValueError("paired_bootstrap: weights must be parallel to the items")
    diff = _weighted_mean(a, w) - _weighted_mean(b, w)
    d_w = (a - b) * w
    rng = np.random.default_rng(seed)
    # resample in blocks so a paper-scale task (10^4+ items) stays within a few tens of MB
    block = max(1, min(n_boot, 4_000_000 // n))
    boots = []
    done = 0
    while done < n_boot:
        k = min(block, n_boot - done)
        idx = rng.integers(0, n, size=(k, n))
        boots.append(d_w[idx].sum(axis=1) / w[idx].sum(axis=1))
        done += k
    boots = np.concatenate(boots)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return {"diff": float(diff), "lo": float(lo), "hi": float(hi), "n": int(n)}


def _t_cdf_numpy(x: float, df: float) -> float:
    # Numerical integral of the Student-t density from 0 to |x| (fallback without scipy).
    grid = np.linspace(0.0, abs(x), 20001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    area = float(np.trapezoid(pdf, grid)) if hasattr(np, "trapezoid") else float(np.trapz(pdf, grid))
    return 0.5 + math.copysign(area, x)


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (scipy if installed, else bisection on a numerical CDF)."""
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    try:
        from scipy import stats as _st
        return float(_st.t.ppf(p, df))
    except ImportError:
        pass
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        if _t_cdf_numpy(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def seed_difference(xs, ys, level: float = LEVEL) -> dict:
    """mean(xs) - mean(ys) across seeds with a Welch t interval.

    Needs at least two seeds on each side; otherwise the interval is nan (unknown), which
    `distinguishable` reports as not distinguishable.
    """
    _check_level(level)
    x = np.asarray(xs, dtype=float).ravel()
    y = np.asarray(ys, dtype=float).ravel()
    diff = float(x.mean() - y.mean()) if x.size and y.size else math.nan
    out = {"diff": diff, "lo": math.nan, "hi": math.nan, "df": math.nan}
    if x.size < 2 or y.size < 2:
        return out
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0:
        out.update(lo=diff, hi=diff, df=math.inf)
        return out
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    out.update(lo=diff - half, hi=diff + half, df=float(df))
    return out


def distinguishable(lo: float, hi: float) -> bool:
    """True when the interval [lo, hi] excludes 0 (an unknown, nan interval does not)."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return False
    return lo > 0 or hi < 0
