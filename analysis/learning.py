"""Learning ability: PLoRA against the LoRA reference at the same rank.

(a) speed: n_LoRA / n_PLoRA, where n_LoRA is the number of training samples at the LoRA run's
    best checkpoint and n_PLoRA the samples at the first PLoRA checkpoint at least as good as
    that best value (no interpolation between checkpoints). 2.0 means PLoRA reached LoRA's
    best with half the samples (the paper's "≈1.8×" and "half the time" are of this kind).
(b) quality: best_PLoRA / best_LoRA, the ratio of the two runs' best values.
Seeds are paired by seed value (else each PLoRA seed faces the first LoRA seed); the interval
is a t interval across those pairs. A PLoRA run that never reaches the target gets no number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis import stats
from analysis.results import LEVEL, Config, eval_metric_keys, group_configs, selection_metric
from analysis.store import Sweep, Trial, lower_is_better

DEFINITION = __doc__.split("\n", 2)[2].strip()


def first_reaching(trial: Trial, metric: str, target: float, lower: bool) -> float | None:
    """Training samples at the first checkpoint whose `metric` is at least as good as `target`."""
    steps, values = trial.history(metric)
    for s, v in zip(steps, values):
        if not math.isnan(v) and (v <= target if lower else v >= target):
            return trial.samples_at(s)
    return None


def best_value(trial: Trial, metric: str, lower: bool) -> float:
    values = [v for v in trial.history(metric)[1] if not math.isnan(v)]
    if not values:
        return math.nan
    return min(values) if lower else max(values)


@dataclass
class Ability:
    plora: Config
    lora: Config
    metric: str
    target: str            # "held-out loss" | "training-set loss" | "benchmark"
    speed: list[float | None]   # per seed pair; None: never reached
    quality: list[float]

    @staticmethod
    def _summary(values: list[float]):
        mean, se = stats.mean_stderr(values)
        if len(values) < 2:
            return mean, math.nan, math.nan
        half = stats.t_quantile(0.5 + LEVEL / 2, len(values) - 1) * se
        return mean, mean - half, mean + half

    @property
    def reached(self) -> int:
        return sum(v is not None for v in self.speed)

    def speed_summary(self):
        """(mean, lo, hi) of (a), or None when some pair never reached the target."""
        if not self.speed or self.reached < len(self.speed):
            return None
        return self._summary(self.speed)

    def quality_summary(self):
        return self._summary([q for q in self.quality if not math.isnan(q)])


def _category(metric: str) -> bool:
    """An MMLU category score (eval/mmlu/stem): a slice of the task, not the task's score."""
    parts = metric.split("/")
    return len(parts) == 3 and parts[1] == "mmlu" and parts[2] != "acc"


def _method(config: Config):
    return config.trials[0].param("method")


def _reference(p: Config, loras: list[Config]) -> Config | None:
    rank = p.trials[0].param("lora.rank")
    same = [c for c in loras if c.trials[0].param("lora.rank") == rank]
    if not same:
        return None

    def agreement(c):  # most shared non-PLoRA choices (e.g. the same LR and modules)
        return sum(c.values.get(k) == v for k, v in p.values.items()
                   if not k.startswith("plora.") and k != "method")

    return max(same, key=agreement)


def learning_ability(sweep: Sweep) -> list[Ability]:
    configs, _ = group_configs(sweep.trials)
    loras = [c for c in configs if _method(c) == "lora"]
    ploras = [c for c in configs if _method(c) == "plora"]
    keys = eval_metric_keys(sweep.trials)
    targets = [(label, metric) for label, metric in LOSS_TARGETS if metric in keys]
    select, _ = selection_metric(sweep)
    # a benchmark curve: a task's own score (not an MMLU category) logged at two checkpoints or
    # more (a benchmark scored only at the end has no "samples to reach")
    curves = [k for k in keys if not k.startswith(("eval/heldout/", "eval/train/")) and not _category(k)
              and any(len(t.history(k)[0]) >= 2 for t in sweep.trials)]
    bench = select if select in curves else next(iter(curves), None)
    if bench:
        targets.append(("benchmark", bench))
    out = []
    for p in ploras:
        ref = _reference(p, loras)
        if ref is None:
            continue
        for label, metric in targets:
            found = ability(sweep, p, ref, metric, label)
            if found is not None:
                out.append(found)
    return out


# the losses scored at every checkpoint (eval.heldout, eval.train_loss): targets when logged
LOSS_TARGETS = (("held-out loss", "eval/heldout/loss"), ("training-set loss", "eval/train/loss"))


def ability(sweep: Sweep, p: Config, ref: Config, metric: str, label: str) -> Ability | None:
    """(a) and (b) of PLoRA configuration ``p`` against LoRA configuration ``ref`` on ``metric``
    (None when no seed pair has a value)."""
    lower = lower_is_better(metric, sweep)
    speed, quality = [], []
    for tp in p.trials:
        tl = next((t for t in ref.trials if t.seed == tp.seed), ref.trials[0])
        target = best_value(tl, metric, lower)
        if math.isnan(target):
            continue
        n_lora = first_reaching(tl, metric, target, lower)
        n_plora = first_reaching(tp, metric, target, lower)
        speed.append(None if n_plora is None or not n_plora or n_lora is None
                     else n_lora / n_plora)
        quality.append(best_value(tp, metric, lower) / target if target else math.nan)
    return Ability(p, ref, metric, label, speed, quality) if speed else None
