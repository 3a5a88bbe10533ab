"""Standard errors as lm-evaluation-harness computes them for mean-aggregated metrics.

``lm_eval.api.metrics.mean_stderr``: the sample standard deviation (n - 1) over the n
per-item values, divided by sqrt(n). Every metric ``<task>/<name>`` gets a sibling
``<task>/<name>_stderr`` in the same flat dict (lm-eval's ``<metric>_stderr`` naming);
subgroups (``mmlu/stem``) use their own items. With fewer than two items the error is
undefined: NaN (lm-eval reports ``N/A``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["mean", "mean_stderr", "with_stderr"]


def mean(values: Iterable[float]) -> float:
    xs = list(values)
    return sum(xs) / len(xs) if xs else float("nan")


def mean_stderr(values: Iterable[float]) -> float:
    xs = [float(x) for x in values]
    if len(xs) < 2:
        return float("nan")
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) / math.sqrt(len(xs))


def with_stderr(name: str, values: Iterable[float]) -> dict[str, float]:
    """``{name: mean, name_stderr: mean_stderr}`` over per-item ``values``."""
    xs = list(values)
    return {name: mean(xs), f"{name}_stderr": mean_stderr(xs)}
