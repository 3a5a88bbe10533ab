"""Which searched values mattered: Optuna's fANOVA and PED-ANOVA on a study rebuilt from the
completed trials (their searched values and their best value of the sweep's metric).

Trials an early-stopping scheduler (ASHA) stopped are completed trials too, but their best value
is from fewer training samples than a finished trial's: when the sweep has any, every trial is
scored by its best value up to the last checkpoint step that *all* of them reached (the budget
ASHA itself compared them at), so no trial is credited for training longer."""

from __future__ import annotations

import math
import warnings

from analysis.results import checkpoint_step, selection_metric
from analysis.store import SEED_KEYS, Sweep

MIN_TRIALS = 10   # below this the importances are noise: the report says so


def _distribution(values: list):
    import optuna.distributions as d

    # a value that is None for some trials (LoRA has no unload point) makes a category
    if all(isinstance(v, bool) for v in values) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return d.CategoricalDistribution(sorted({str(v) for v in values})), str
    low, high = min(values), max(values)
    if all(isinstance(v, int) for v in values):
        return d.IntDistribution(int(low), int(high)), int
    log = low > 0 and high / low >= 100  # learning rates and the like span decades
    return d.FloatDistribution(float(low), float(high), log=log), float


COMPLETED = ("finished", "stopped_early")


def common_step(trials: list, metric: str) -> int | None:
    """The last checkpoint step at which every one of ``trials`` reported ``metric``."""
    lasts = [max((s for s, v in zip(*t.history(metric)) if not math.isnan(v)), default=None)
             for t in trials]
    return None if not lasts or None in lasts else min(lasts)


def best_up_to(trial, metric: str, lower: bool, step: int | None) -> float:
    values = [v for s, v in zip(*trial.history(metric))
              if not math.isnan(v) and (step is None or s <= step)]
    if not values:
        return math.nan
    return min(values) if lower else max(values)


def study_from_sweep(sweep: Sweep):
    """(study, metric, n_trials, budget_step): completed trials (finished or stopped early by the
    scheduler) with a value of the selection metric; ``budget_step`` is the step their values
    are taken up to (None: each finished trial's whole run)."""
    import optuna

    metric, lower = selection_metric(sweep)
    done = [t for t in sweep.trials if metric is not None and t.status in COMPLETED
            and checkpoint_step(t, metric, lower, "best") is not None]
    budget = common_step(done, metric) if any(t.status == "stopped_early" for t in done) else None
    rows = []
    for t in done:
        value = best_up_to(t, metric, lower, budget)
        params = {k: v for k, v in t.space.items() if k not in SEED_KEYS}
        if math.isfinite(value) and params:
            rows.append((params, value))
    keys = sorted({k for p, _ in rows for k in p})
    # a value absent from some trials cannot enter a fixed search space; one value never varies
    keys = [k for k in keys if all(k in p for p, _ in rows) and len({repr(p[k]) for p, _ in rows}) > 1]
    dists = {}
    for k in keys:
        dists[k] = _distribution([p[k] for p, _ in rows])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if lower else "maximize")
    for params, value in rows:
        study.add_trial(optuna.trial.create_trial(
            value=value, params={k: dists[k][1](params[k]) for k in keys},
            distributions={k: dists[k][0] for k in keys}))
    return study, metric, len(rows), budget


def param_importances(sweep: Sweep, seed: int = 0) -> dict:
    """{"metric", "n_trials", "budget_step", "fanova": {param: importance}, "ped_anova": {...},
    "warning"}."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    study, metric, n, budget = study_from_sweep(sweep)
    out = {"metric": metric, "n_trials": n, "budget_step": budget, "fanova": {}, "ped_anova": {},
           "warning": None}
    if n < MIN_TRIALS:
        out["warning"] = (f"only {n} completed trial(s) (fewer than {MIN_TRIALS}): "
                          "the importances below are not reliable")
    if n < 2 or not study.trials[0].params:
        out["warning"] = out["warning"] or "fewer than two varied parameters or trials"
        return out
    if len({t.value for t in study.trials}) < 2:  # fANOVA: "zero total variance in all trees"
        out["warning"] = "every completed trial has the same metric value: nothing to attribute"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API warnings
        try:
            out["fanova"] = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=seed))
        except RuntimeError as exc:  # e.g. a parameter whose values never vary the metric
            out["fanova_error"] = str(exc).splitlines()[0]
        try:
            out["ped_anova"] = optuna.importance.get_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator())
        except Exception as exc:  # too few trials for its top quantile
            out["ped_anova_error"] = str(exc).splitlines()[0]
    return out
