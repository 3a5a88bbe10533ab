"""PLoRA − LoRA at the last checkpoint, paired two ways.

For each PLoRA configuration and its LoRA reference at the same rank (the pairing
`learning.py` uses), every evaluated metric's difference ``PLoRA − LoRA`` at each run's last
checkpoint, with two 95 % intervals:

* **seeds**: runs paired by seed value, a t interval over the per-seed differences (what a new
  seed would do; needs two pairs or more);
* **items**: each item's score averaged over the seeds of each side, then a paired bootstrap
  over the items both sides scored (which held-out problems or benchmark questions were drawn;
  token-weighted for the held-out loss).

A difference is called distinguishable only when *both* intervals exclude 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis import stats
from analysis.learning import _method, _reference
from analysis.results import Config, checkpoint_step, eval_metric_keys, group_configs, item_scores
from analysis.stats import LEVEL
from analysis.store import Sweep, lower_is_better

DEFINITION = __doc__.split("\n", 2)[2].strip()


@dataclass
class Difference:
    plora: Config
    lora: Config
    metric: str
    diff: float
    seeds: dict        # {"diff", "lo", "hi", "n"}
    items: dict        # {"diff", "lo", "hi", "n"}
    lower: bool | None = None  # lower is better (None: by the metric's name)

    @property
    def distinguishable(self) -> bool:
        return all(stats.distinguishable(d["lo"], d["hi"]) for d in (self.seeds, self.items))

    @property
    def better(self) -> str | None:
        """"plora" or "lora" when distinguishable, else None."""
        if not self.distinguishable:
            return None
        lower = lower_is_better(self.metric) if self.lower is None else self.lower
        return "plora" if (self.diff < 0) == lower else "lora"


def _seed_interval(diffs: list[float]) -> dict:
    mean, se = stats.mean_stderr(diffs)
    out = {"diff": mean, "lo": math.nan, "hi": math.nan, "n": len(diffs)}
    if len(diffs) >= 2:
        half = stats.t_quantile(0.5 + LEVEL / 2, len(diffs) - 1) * se
        out.update(lo=mean - half, hi=mean + half)
    return out


def _item_interval(pairs: list[tuple]) -> dict:
    """Per-item scores averaged over the seed pairs (items every pair scored), bootstrapped."""
    if not pairs:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    ids = set.intersection(*(set(p[0]) for p in pairs))
    order = sorted(ids)
    a = np.mean([[dict(zip(p[0], p[1]))[i] for i in order] for p in pairs], axis=0)
    b = np.mean([[dict(zip(p[0], p[2]))[i] for i in order] for p in pairs], axis=0)
    w = None
    if pairs[0][3] is not None:
        w = np.array([dict(zip(pairs[0][0], pairs[0][3]))[i] for i in order])
    res = stats.paired_bootstrap(a, b, weights=w, level=LEVEL)
    return {"diff": res["diff"], "lo": res["lo"], "hi": res["hi"], "n": len(order)}


def method_differences(sweep: Sweep) -> list[Difference]:
    configs, _ = group_configs(sweep.trials)
    loras = [c for c in configs if _method(c) == "lora"]
    out = []
    for p in (c for c in configs if _method(c) == "plora"):
        ref = _reference(p, loras)
        if ref is None:
            continue
        for metric in eval_metric_keys(sweep.trials):
            lower = lower_is_better(metric, sweep)
            diffs, item_pairs = [], []
            for tp in p.trials:
                tl = next((t for t in ref.trials if t.seed == tp.seed), None)
                if tl is None:
                    continue
                sp = checkpoint_step(tp, metric, lower, "last")
                sl = checkpoint_step(tl, metric, lower, "last")
                if sp is None or sl is None:
                    continue
                diffs.append(tp.value_at(metric, sp) - tl.value_at(metric, sl))
                items = _ids_and_scores(tp, sp, tl, sl, metric)
                if items is not None:
                    item_pairs.append(items)
            if diffs:
                seeds = _seed_interval(diffs)
                items = _item_interval(item_pairs) if len(item_pairs) == len(diffs) else \
                    {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
                out.append(Difference(p, ref, metric, seeds["diff"], seeds, items, lower))
    return out


def _ids_and_scores(tp, sp, tl, sl, metric):
    """(ids, PLoRA scores, LoRA scores, weights) of the items both checkpoints scored."""
    sa = item_scores(tp.items(sp), metric)
    sb = item_scores(tl.items(sl), metric)
    if sa is None or sb is None:
        return None
    index_b = {i: k for k, i in enumerate(sb[0])}
    keep = [k for k, i in enumerate(sa[0]) if i in index_b]
    if not keep:
        return None
    ids = [sa[0][k] for k in keep]
    weights = None if sa[2] is None else [float(sa[2][k]) for k in keep]
    return ids, [float(sa[1][k]) for k in keep], [float(sb[1][index_b[i]]) for i in ids], weights
