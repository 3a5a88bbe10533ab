"""A sweep's trials as run configs: base + fixed + resources + the values a trial draws.

What :mod:`plora_ray.config.sweep` checks a file with (every value a trial can get is built into
a RunConfig, alone and in every combination up to ``MAX_COMBINATIONS``) and what a trial runs
(:func:`trial_run_config`, ``model.dtype: auto`` resolved as in ``build_run_config``).
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from pydantic import ValidationError

from plora_ray.config.hardware import resolve_dtype
from plora_ray.config.io import apply_override, build_run_config, format_validation_error
from plora_ray.config.names import TASKS
from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.config.spec import SweepSpec

MAX_COMBINATIONS = 4096  # ~0.1 ms each; beyond, each value alone and the first trial
TRIAL_INDEX = "__trial_index__"  # a trial's repeat index (ray.tune.search.repeater.TRIAL_INDEX)


def key_paths(key: str) -> list[str]:
    """The run-config paths of a space key (a joint key names several, comma-separated)."""
    return [p.strip() for p in key.split(",")]


def check_values(spec: SweepSpec) -> None:
    """Build a RunConfig for each value alone, then for every combination of the values a
    trial can get (each choice/grid value, both bounds of a range)."""
    src, check = spec._source, spec._check_paths
    problem = _problem(trial_data(spec, {}), check)
    if problem:
        raise ConfigError(f"{src}: field 'fixed': base + fixed + resources are rejected by the "
                          f"run config ({problem[0]}): fix the value")
    task = spec.metric.split("/")[1] if spec.metric.startswith("eval/") else None
    cfg = RunConfig.model_validate(trial_data(spec, {}))  # dtype auto unresolved: not needed here
    if task == "heldout":
        h = cfg.eval.heldout
        embedded = h.files is None and cfg.data.embedded()
        if not (embedded or h.files or h.fraction > 0):
            raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: name held-out "
                              "files (eval: {heldout: {files: [...]}}) or keep a fraction of the training "
                              "rows out (eval: {heldout: {fraction: 0.1}})")
    elif task == "train":
        if cfg.eval.train_loss is None:
            raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: score a subset of "
                              "the training examples (eval: {train_loss: {limit: 64}})")
    elif task and task not in TASKS:  # an lm-evaluation-harness task (names.harness_metric_task)
        if task not in cfg.eval.harness.tasks:
            raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: add {task} to "
                              f"the base's eval.harness.tasks (eval: {{harness: {{tasks: [{task}]}}}})")
        if cfg.eval.harness.at == "last" and cfg.checkpoint_every_steps:  # Tune needs it in every report
            raise ConfigError(f"{src}: field 'metric': {spec.metric} is scored at the last checkpoint only "
                              "(eval.harness.at: last), but Tune needs it at every checkpoint: set "
                              "eval.harness.at: every")
    elif task and task not in cfg.eval.tasks and task not in cfg.eval.harness.tasks:
        raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: add {task} to "
                          f"the base's eval.tasks (eval: {{tasks: [{task}]}})")
    for key, dist in spec.space.items():
        for value in dist.values:
            problem = _problem(trial_data(spec, {key: value}), check)
            if problem and problem[1]:  # a field error; model-level ones may need other keys
                raise ConfigError(f"{src}: field 'space.{key}': value {value!r} is rejected by the "
                                  f"run config ({problem[0]}): change or remove it")
    keys, values = list(spec.space), [d.values for d in spec.space.values()]
    if math.prod(map(len, values)) > MAX_COMBINATIONS:
        values = [v[:1] for v in values]  # too many: the first trial only
    for combo in itertools.product(*values):
        point = dict(zip(keys, combo))
        problem = _problem(trial_data(spec, point), check)
        if problem:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"{src}: field 'space': the trial {{{shown}}} is rejected by the run "
                              f"config ({problem[0]}): draw dependent paths together in one joint "
                              "key ('a, b': {grid: [[a1, b1], ...]}) or change the values")


def _problem(data: dict, check_paths: bool) -> tuple[str, bool] | None:
    """(message, is a field error) if the run config rejects ``data``, else None."""
    try:
        resolve_dtype(RunConfig.model_validate(data))
    except ValidationError as exc:
        return format_validation_error(exc), any(e["loc"] for e in exc.errors())
    if check_paths:
        try:
            build_run_config(data, "run")
        except ConfigError as exc:
            return str(exc).removeprefix("run: "), True
    return None


def validate_run(data: dict, source: str, check_paths: bool) -> RunConfig:
    """The RunConfig to run (dtype resolved); ``check_paths=False``: without the file checks."""
    if check_paths:
        return build_run_config(data, source)
    try:
        return resolve_dtype(RunConfig.model_validate(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def trial_data(spec: SweepSpec, params: dict[str, Any]) -> dict:
    """base, then fixed, then resources, then the trial's values: later ones win."""
    data = copy.deepcopy(spec.base)
    for path, value in spec.fixed.items():
        apply_override(data, path, copy.deepcopy(value))
    r = spec.resources  # filled from the base by _check when the file leaves it out
    apply_override(data, "distributed.workers", r.workers)
    apply_override(data, "distributed.cpus_per_worker", r.cpus_per_worker)
    apply_override(data, "distributed.use_gpu", r.gpus_per_worker > 0)
    apply_override(data, "distributed.gpus_per_worker", r.gpus_per_worker if r.gpus_per_worker > 0 else None)
    apply_override(data, "distributed.placement_strategy", r.placement_strategy)
    apply_override(data, "distributed.max_failures", spec.failures.worker_restarts)
    for path, value in trial_values(params).items():
        apply_override(data, path, copy.deepcopy(value))
    if params.get(TRIAL_INDEX):  # a repeat: seed = base seed + index
        data["seed"] = int(data.get("seed", 0)) + int(params[TRIAL_INDEX])
    return data


def trial_values(trial_params: dict[str, Any]) -> dict[str, Any]:
    """``{run-config path: value}`` with joint keys split: names MLflow accepts as params (no
    commas) and the values that differ between trials, for logging and trial names."""
    out = {}
    for key, value in trial_params.items():
        if key == TRIAL_INDEX:  # the seed's index, not a run-config path
            continue
        paths = key_paths(key)
        out.update(zip(paths, value) if len(paths) > 1 else [(key, value)])
    return out


def trial_run_config(spec: SweepSpec, trial_params: dict[str, object], name: str | None = None) -> RunConfig:
    """The validated RunConfig of one trial: base + fixed + resources + its sampled values."""
    data = trial_data(spec, trial_params)
    if name:
        data["name"] = name
    return validate_run(data, f"{spec._source}: trial {name or trial_params}", spec._check_paths)


def trial_points(spec: SweepSpec, touching: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Space points covering every value a trial can get: none (base + fixed), each value alone
    (both bounds of a range), then every combination of the entries with a path under one of
    ``touching`` (all entries if empty); beyond MAX_COMBINATIONS, the first value of each."""
    def touches(key: str) -> bool:
        return not touching or any(p == t or p.startswith(t + ".") for p in key_paths(key) for t in touching)

    keys = [key for key in spec.space if touches(key)]
    points = [{}] + [{key: value} for key in keys for value in spec.space[key].values]
    values = [spec.space[key].values for key in keys]
    if math.prod(map(len, values)) > MAX_COMBINATIONS:
        values = [v[:1] for v in values]
    if len(keys) > 1:
        points += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return points


def one_process_trials(spec: SweepSpec) -> bool:
    """Whether every trial of ``spec`` is one process: one worker with the torch engine. Such
    a sweep trains each trial in its Tune function, without a Ray Train worker group
    (``sweep/tune.py``); ``distributed.*`` values a trial can draw are all looked at."""
    for point in trial_points(spec, ("distributed",)):
        d = trial_run_config(spec, point).distributed
        if d.workers != 1 or d.engine != "ddp":
            return False
    return True
