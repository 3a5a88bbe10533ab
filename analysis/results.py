"""From trials to numbers: checkpoints, configurations, table cells with intervals, marking.

A *configuration* is a trial's searched values without the seed (tag `plora.config_id`); its
repeats (seeds) are averaged. A cell is a configuration's value of one metric at its best or
last checkpoint, with an interval: across seeds (t interval) when there are several, else the
lm-eval stderr the evaluator logged (normal interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analysis import stats
from analysis.stats import LEVEL
from analysis.store import SEED_KEYS, Sweep, Trial, lower_is_better

# column order of the paper's tables; anything else follows alphabetically
PAPER_ORDER = ("eval/gsm8k/", "eval/mmlu/", "eval/arc_easy/", "eval/arc_challenge/",
               "eval/heldout/")
MMLU_AVERAGE = "eval/mmlu/acc"
ROW_ORDER = ("method", "lora.rank", "lora.target_modules", "optim.lr",
             "plora.unload_every_samples", "plora.unload_every_steps", "plora.momentum")
TRAINABLE = "model/trainable_params"
# params that differ between runs without being a choice of the experiment
_NOT_A_CHOICE = ("seed", "output", "dir", "path", "tracking", "run_id", "name")


def eval_metric_keys(trials: list[Trial]) -> list[str]:
    """The benchmark metrics to report, in the paper's order; a category of a benchmark scored
    on fewer than ``stats.MIN_GROUP_ITEMS`` items is left out (:func:`small_groups`)."""
    keys = {k for t in trials for k in t.metric_keys
            if k.startswith("eval/") and not k.endswith("_stderr") and k != "eval/samples"}
    keys -= set(small_groups(trials, keys))

    def order(key):
        for i, prefix in enumerate(PAPER_ORDER):
            if key.startswith(prefix):
                # MMLU: the categories first, their average last (as in the paper)
                return (i, key == MMLU_AVERAGE, key)
        return (len(PAPER_ORDER), False, key)

    return sorted(keys, key=order)


def small_groups(trials: list[Trial], keys=None, min_items: int = stats.MIN_GROUP_ITEMS) -> dict[str, int]:
    """``{metric: items}`` of the benchmark categories (``eval/mmlu/stem``: the items of one
    ``category`` in a task's per-item results) that no trial scored on ``min_items`` items or
    more at its last checkpoint of them; a metric without per-item results is kept."""
    counts: dict[str, int] = {}
    for t in trials:
        if not isinstance(t, Trial):
            continue
        for key in keys if keys is not None else t.metric_keys:
            parts = key.split("/")
            steps = t.history(key)[0] if len(parts) == 3 and key.startswith("eval/") else []
            task = ((t.items(steps[-1]) or {}).get("tasks") or {}).get(parts[1]) if steps else None
            if task and parts[2] not in task and "category" in task:
                counts[key] = max(counts.get(key, 0), sum(c == parts[2] for c in task["category"]))
    return {k: n for k, n in sorted(counts.items()) if n < min_items}


def selection_metric(sweep: Sweep) -> tuple[str | None, bool]:
    """(metric, lower_is_better) that picks a trial's best checkpoint: the sweep's metric,
    else the held-out loss, else the first eval metric."""
    keys = eval_metric_keys(sweep.trials)
    metric = sweep.metric if sweep.metric in keys else None
    if metric is None:
        metric = "eval/heldout/loss" if "eval/heldout/loss" in keys else (keys[0] if keys else None)
    if metric is None:
        return None, True
    return metric, lower_is_better(metric, sweep)


def checkpoint_step(trial: Trial, metric: str, lower: bool, which: str) -> int | None:
    """The step of the trial's best (by `metric`) or last checkpoint; None without one."""
    steps, values = trial.history(metric)
    pairs = [(s, v) for s, v in zip(steps, values) if not math.isnan(v)]
    if not pairs:
        return None
    if which == "last":
        return pairs[-1][0]
    sign = 1 if lower else -1
    return min(pairs, key=lambda p: (sign * p[1], p[0]))[0]  # earliest among equal values


def item_scores(items: dict | None, metric: str):
    """(ids, values, weights) of one metric from a per-item artifact, or None.

    `eval/heldout/loss` is weighted by tokens (the task's loss is token-weighted); an MMLU
    category (`eval/mmlu/stem`) is the `acc` of the items of that category.
    """
    if not items or not metric.startswith("eval/"):
        return None
    parts = metric.split("/")
    if len(parts) != 3:
        return None
    task = (items.get("tasks") or {}).get(parts[1])
    if not task or "ids" not in task:
        return None
    name = parts[2]
    ids = list(task["ids"])
    if name in task:
        weights = task.get("tokens") if name == "loss" else None
        return ids, np.asarray(task[name], float), (
            None if weights is None else np.asarray(weights, float))
    if "category" in task and "acc" in task:
        keep = [i for i, c in enumerate(task["category"]) if c == name]
        if keep:
            acc = np.asarray(task["acc"], float)
            return [ids[i] for i in keep], acc[keep], None
    return None


def paired_items(a: Trial, step_a: int, b: Trial, step_b: int, metric: str):
    """Per-item values of `metric` for the items both checkpoints scored (same ids)."""
    sa = item_scores(a.items(step_a), metric)
    sb = item_scores(b.items(step_b), metric)
    if sa is None or sb is None:
        return None
    index_b = {i: k for k, i in enumerate(sb[0])}
    pairs = [(k, index_b[i]) for k, i in enumerate(sa[0]) if i in index_b]
    if not pairs:
        return None
    ka, kb = (np.array(x) for x in zip(*pairs))
    weights = sa[2][ka] if sa[2] is not None else None
    return sa[1][ka], sb[1][kb], weights


# ----------------------------------------------------------------------------- configurations


def config_key(trial: Trial):
    if "plora.config_id" in trial.tags:
        return trial.tags["plora.config_id"]
    if trial.space:
        return tuple(sorted((k, repr(v)) for k, v in trial.space.items() if k not in SEED_KEYS))
    return tuple(sorted((k, v) for k, v in trial.params.items()
                        if not any(word in k for word in _NOT_A_CHOICE)))


def varied_keys(trials: list[Trial]) -> list[str]:
    """The searched values that differ across the trials (seed excluded), in the paper's order."""
    if any(t.space for t in trials):
        keys = {k for t in trials for k in t.space if k not in SEED_KEYS}
        values = lambda k: {repr(t.space.get(k)) for t in trials}  # noqa: E731
    else:
        keys = {k for t in trials for k in t.params
                if not any(word in k for word in _NOT_A_CHOICE)}
        values = lambda k: {t.params.get(k) for t in trials}  # noqa: E731
    varied = [k for k in keys if len(values(k)) > 1]

    def order(k):
        return (ROW_ORDER.index(k) if k in ROW_ORDER else len(ROW_ORDER), k)

    return sorted(varied, key=order)


@dataclass
class Config:
    key: object
    trials: list[Trial]
    values: dict = field(default_factory=dict)  # varied key -> value

    @property
    def running(self) -> bool:
        return any(t.running for t in self.trials)

    def label(self) -> str:
        """The varied values; when nothing varied, the searched values; else the run name."""
        shown = self.values or {k: v for k, v in self.trials[0].space.items()
                                if k not in SEED_KEYS}
        return " ".join(f"{k}={show(v)}" for k, v in shown.items()) or self.trials[0].name


def show(value) -> str:
    """A searched value as tables print it: floats to 4 significant digits (0.0006978)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def group_configs(trials: list[Trial]) -> tuple[list[Config], list[str]]:
    varied = varied_keys(trials)
    groups: dict = {}
    for t in trials:
        groups.setdefault(config_key(t), []).append(t)
    configs = [Config(k, ts, {v: ts[0].param(v) for v in varied}) for k, ts in groups.items()]

    def sort_key(c):
        return tuple((str(type(v)), v if isinstance(v, (int, float)) else str(v))
                     for v in c.values.values())

    configs.sort(key=sort_key)
    return configs, varied


# ----------------------------------------------------------------------------- cells


@dataclass
class Cell:
    value: float
    lo: float
    hi: float
    n_seeds: int
    per_seed: list[float]
    steps: list[int | None]          # checkpoint step of each seed
    best: bool = False
    tied: bool = False               # not distinguishable from the column's best
    test: str = ""                   # how the tie was decided

    def text(self, digits: int = 4) -> str:
        if math.isnan(self.value):
            return "—"
        body = f"{self.value:.{digits}f}"
        if not (math.isnan(self.lo) or math.isnan(self.hi)):
            body += f" [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"
        if self.best:
            return f"**{body}**"
        return body + (" ≈" if self.tied else "")


def cell_for(config: Config, metric: str, select: str, lower: bool, which: str) -> Cell:
    """One seed: the evaluator's stderr interval, or Wilson's for a mean of 0/1 items (inside
    [0, 1]); several: a t interval across seeds (clipped to [0, 1] for such a mean)."""
    values, ses, steps, items = [], [], [], []
    for t in config.trials:
        step = checkpoint_step(t, select, lower, which)
        steps.append(step)
        if step is None:
            continue
        v = t.value_at(metric, step)
        if math.isnan(v):
            continue
        values.append(v)
        ses.append(t.value_at(metric + "_stderr", step))
        found = item_scores(t.items(step), metric)
        items.append(None if found is None else found[1])
    if not values:
        return Cell(math.nan, math.nan, math.nan, 0, [], steps)
    proportion = all(x is not None and stats.is_proportion(x) for x in items)
    if len(values) == 1:
        lo, hi = stats.item_interval(values[0], ses[0], items[0] if proportion else None, LEVEL)
        return Cell(values[0], lo, hi, 1, values, steps)
    mean, se = stats.mean_stderr(values)
    half = stats.t_quantile(0.5 + LEVEL / 2, len(values) - 1) * se
    lo, hi = (max(0.0, mean - half), min(1.0, mean + half)) if proportion else (mean - half, mean + half)
    return Cell(mean, lo, hi, len(values), values, steps)


def _representative(config: Config, cell: Cell, seed=None):
    """(trial, step) used for a paired test: the trial with `seed` if any, else the first."""
    pairs = [(t, s) for t, s in zip(config.trials, cell.steps) if s is not None]
    for t, s in pairs:
        if seed is not None and t.seed == seed:
            return t, s
    return pairs[0] if pairs else (None, None)


def compare_cells(metric: str, a: Config, ca: Cell, b: Config, cb: Cell) -> dict:
    """Difference a - b with an interval: across seeds when both have several, else paired
    over items (same ids), else unpaired normal from the logged stderrs."""
    if ca.n_seeds >= 2 and cb.n_seeds >= 2:
        return {**stats.seed_difference(ca.per_seed, cb.per_seed, LEVEL), "test": "seeds"}
    ta, sa = _representative(a, ca)
    tb, sb = _representative(b, cb, ta.seed if ta is not None else None)
    if ta is not None and tb is not None:
        paired = paired_items(ta, sa, tb, sb, metric)
        if paired is not None:
            return {**stats.paired_bootstrap(*paired[:2], weights=paired[2], level=LEVEL),
                    "test": "paired"}
        se_a = ta.value_at(metric + "_stderr", sa)
        se_b = tb.value_at(metric + "_stderr", sb)
        diff = ta.value_at(metric, sa) - tb.value_at(metric, sb)
        if not (math.isnan(se_a) or math.isnan(se_b)):
            lo, hi = stats.normal_interval(diff, math.hypot(se_a, se_b), LEVEL)
            return {"diff": diff, "lo": lo, "hi": hi, "test": "unpaired"}
    return {"diff": ca.value - cb.value, "lo": math.nan, "hi": math.nan, "test": "none"}


def mark_column(metric: str, configs: list[Config], cells: list[Cell], lower: bool) -> None:
    """Bold the column's best cell; mark the cells not distinguishable from it."""
    scored = [i for i, c in enumerate(cells) if not math.isnan(c.value)]
    if not scored:
        return
    sign = 1 if lower else -1
    best = min(scored, key=lambda i: sign * cells[i].value)
    cells[best].best = True
    for i in scored:
        if i == best:
            continue
        res = compare_cells(metric, configs[i], cells[i], configs[best], cells[best])
        cells[i].test = res["test"]
        cells[i].tied = not stats.distinguishable(res["lo"], res["hi"])


@dataclass
class Table:
    which: str                      # "best" | "last"
    varied: list[str]
    configs: list[Config]
    metrics: list[str]
    cells: dict                     # metric -> list[Cell] parallel to configs
    trainable: list[float]


def build_table(sweep: Sweep, which: str) -> Table:
    configs, varied = group_configs(sweep.trials)
    select, lower = selection_metric(sweep)
    metrics = eval_metric_keys(sweep.trials)
    cells = {}
    for metric in metrics:
        column = [cell_for(c, metric, select, lower, which) for c in configs]
        mark_column(metric, configs, column, lower_is_better(metric, sweep))
        cells[metric] = column
    trainable = []
    for c in configs:
        counts = [c.trials[0].run.data.metrics.get(TRAINABLE, math.nan)]
        trainable.append(counts[0])
    return Table(which, varied, configs, metrics, cells, trainable)
