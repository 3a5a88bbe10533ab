"""Search spaces: the schema of ``search_spaces/*.yaml`` and its translation to Ray Tune.

    python -m plora_ray.tune search_spaces/unload.yaml [--set num_samples=2 --set base.data.max_steps=4]

A sweep file names a ``base`` run config (inline, or a run YAML relative to the sweep file), the
``metric`` and ``mode``, a ``searcher``, an optional ASHA ``scheduler``, per-trial ``resources``,
values ``fixed`` for every trial and a ``space`` of distributions over dotted run-config paths:
``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
``{int: [lo, hi]}`` (inclusive). A *joint key* (``"method, lora.rank": {grid: [[lora, 1],
[full, 8]]}``) draws its paths together, one list per value: that is how a paper table's columns
become trials without the invalid or duplicate corners of a cross product (``plora`` with no
unload point, full fine-tuning once per rank).

Searchers: ``optuna`` (seeded TPE; Ray's OptunaSearch cannot take ``grid``), ``random`` (Ray's
basic variant generator: samples the other entries for each grid point) and ``grid`` (grid
entries only); default ``grid`` if every entry is a grid, else ``optuna``. As in Ray Tune,
``num_samples`` counts trials for optuna and repeats of the grid otherwise.

Everything is checked before a trial starts: each value a trial can get (every choice and grid
value, both bounds of a range) is built into a RunConfig, alone and in every combination (up to
``MAX_COMBINATIONS``), so ``m = 1`` or a typo fails in a second with one line naming the field,
not an hour into the sweep.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from plora_ray.config.schema import (ConfigError, RunConfig, apply_override, build_run_config, format_validation_error,
                     nearest_key, parse_override, read_yaml)

from plora_ray.config.names import EMBEDDED_MIXES, METRICS  # noqa: E402
Kind = Literal["choice", "grid", "uniform", "loguniform", "int"]
KINDS = typing.get_args(Kind)
# trial resources are set once, under `resources`, so Ray's reservation and the run agree
RESOURCE_PATHS = {"distributed.workers": "resources.workers",
                  "distributed.cpus_per_worker": "resources.cpus_per_worker",
                  "distributed.use_gpu": "resources.gpus_per_worker",
                  "distributed.gpus_per_worker": "resources.gpus_per_worker",
                  "distributed.placement_strategy": "resources.placement_strategy",
                  "distributed.max_failures": "failures.worker_restarts"}
DEFAULT_WORKER_RESTARTS = 1  # a lost worker or node: once from the last checkpoint, then Tune's retry
MAX_COMBINATIONS = 4096  # ~0.1 ms each; beyond, each value alone and the first trial
TRIAL_INDEX = "__trial_index__"  # a trial's repeat index (ray.tune.search.repeater.TRIAL_INDEX)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Distribution(_Strict):
    """One ``space`` entry, ``{kind: values}`` in YAML: ``{int: [1, 8]}`` is inclusive."""

    kind: Kind
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("must be a distribution such as {choice: [1, 8]}; "
                             "a value for every trial goes under 'fixed'")
        if set(data) == {"kind", "values"}:
            return data
        for key in data:
            if key not in KINDS:
                hint = difflib.get_close_matches(str(key), KINDS, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"use one of {', '.join(KINDS)}"
                raise ValueError(f"unknown distribution '{key}': {fix}")
        if len(data) != 1:
            raise ValueError(f"has {len(data)} distributions ({', '.join(data)}): keep one")
        (kind, values), = data.items()
        if not isinstance(values, list):
            raise ValueError(f"{kind} needs a list of values (got {values!r})")
        if kind in ("choice", "grid"):
            if not values:
                raise ValueError(f"{kind} needs at least one value")
            return {"kind": kind, "values": values}
        if len(values) != 2:
            raise ValueError(f"{kind} needs [low, high] (got {values!r})")
        lo, hi = (_bound(v, kind) for v in values)
        if lo >= hi:
            raise ValueError(f"{kind} needs low < high (got [{lo}, {hi}])")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {lo}): use uniform to include 0")
        return {"kind": kind, "values": [lo, hi]}


def _bound(value: Any, kind: str) -> float | int:
    """A range bound; text like '1e-4' is a number (YAML 1.1 reads 1e-4 without a dot as text)."""
    if kind == "int" and type(value) is int:
        return value
    if kind != "int" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{kind} needs {'whole-number' if kind == 'int' else 'number'} bounds (got {value!r})")


class Searcher(_Strict):
    type: Literal["optuna", "random", "grid"] | None = Field(
        None, description="optuna (seeded TPE) | random | grid; default grid if every space "
        "entry is a grid, else optuna")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="searcher seed (numpy's range: 0 to 2**32 - 1)")


class Scheduler(_Strict):
    type: Literal["asha", "none"] = "none"
    grace_period: int = Field(1, ge=1, description="reports (checkpoints) before a trial can stop")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="reports per trial at most; null: Ray's default")

    @model_validator(mode="after")
    def _grace_within_max_t(self) -> "Scheduler":
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} is above max_t {self.max_t}: "
                             "lower grace_period or raise max_t")
        return self


class Resources(_Strict):
    """Per trial; written into the run's ``distributed`` section. Unset: the base's values."""

    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="> 0 sets distributed.use_gpu; a "
                                          "fraction below 1 shares a GPU (0.5: two workers per GPU)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="placement of a trial's workers (STRICT_PACK: one node per trial)")


class Failures(_Strict):
    """What a sweep does when something dies; unset: the defaults below."""

    trial_retries: int = Field(1, ge=-1, description="Tune reruns a failed trial (its driver-side "
                               "function died, or its workers ran out of restarts) from its last "
                               "checkpoint this many times; -1: without limit")
    worker_restarts: int | None = Field(None, ge=-1, description="Train restarts a trial's worker group "
                                        "from the last checkpoint when a worker or its node is lost "
                                        f"(distributed.max_failures); default: the base's, else "
                                        f"{DEFAULT_WORKER_RESTARTS}; -1: without limit")


class SweepSpec(_Strict):
    name: str | None = Field(None, description="sweep name; default the file's stem")
    base: dict[str, Any] = Field(description="run config (a path in the file is read first)")
    metric: str
    mode: Literal["min", "max"] | None = Field(None, description="default: min for train/loss, else max")
    searcher: Searcher = Searcher()
    num_samples: int = Field(1, ge=1, description="trials (optuna) or repeats of the grid")
    repeats: int = Field(1, ge=1, description="seeds per configuration (seed = base seed + 0, 1, ...): "
                         "separate trials, aggregated in the sweep's summary")
    max_concurrent: int = Field(1, ge=1)
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    failures: Failures = Failures()
    space: dict[str, Distribution] = {}
    fixed: dict[str, Any] = {}
    _source: str = PrivateAttr("sweep")
    _check_paths: bool = PrivateAttr(True)

    @field_validator("space", "fixed", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `space:` with every entry commented out

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRICS:
            hint = difflib.get_close_matches(value, METRICS, n=1, cutoff=0.4)
            raise ValueError(f"unknown metric: did you mean '{hint[0]}'?" if hint
                             else f"unknown metric: use one of {', '.join(METRICS)}")
        return value

    @model_validator(mode="after")
    def _default_mode(self) -> "SweepSpec":
        if self.mode is None:
            self.mode = "min" if self.metric == "train/loss" else "max"
        return self


# ---------------------------------------------------------------------------- loading


def load_sweep(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> SweepSpec:
    """Read, override (``key=value``; ``space.<path>=null`` drops an entry) and validate a
    sweep file; raises ConfigError (one line). ``check_paths=False`` skips the existence
    checks of model and data paths (the paper-scale files on a machine without them)."""
    path = Path(path)
    data = read_yaml(path)
    base_file = _resolve_base(data, path)
    for item in overrides:
        try:
            _set(data, *parse_override(item))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        base_file = _resolve_base(data, path) or base_file
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, SweepSpec)}") from None
    spec._source, spec._check_paths = str(path), check_paths
    spec.name = spec.name or path.stem
    _check(spec, f"{path}: base" + (f" ({base_file})" if base_file else ""))
    return spec


def _resolve_base(data: dict, path: Path) -> Path | None:
    """Replace a ``base`` path (relative to the sweep file) by the run YAML's mapping."""
    if not isinstance(data.get("base"), str):
        return None
    base = path.parent / Path(data["base"]).expanduser()
    if not base.is_file():
        raise ConfigError(f"{path}: field 'base': run config '{base}' not found: give a path "
                          f"relative to '{path.parent}' or an inline mapping")
    data["base"] = read_yaml(base)
    return base


def _set(data: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head not in ("space", "fixed") or not rest:  # their keys are dotted paths themselves
        return apply_override(data, key, value)
    if not isinstance(data.get(head), dict):
        data[head] = {}
    if head == "space" and value is None:
        data[head].pop(rest, None)
    else:
        data[head][rest] = value


def _paths(key: str) -> list[str]:
    return [p.strip() for p in key.split(",")]


def _field(path: str):
    """The run-config field at a dotted path (None if there is none)."""
    model, info = RunConfig, None
    for part in path.split("."):
        fields = getattr(model, "model_fields", {}) if isinstance(model, type) else {}
        if part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info


def _check_path(spec: SweepSpec, where: str, path: str) -> None:
    info, field = _field(path), f"field '{where}'"
    if info is None:
        hint = nearest_key(path)
        fix = f"did you mean '{hint}'?" if hint else "see plora_ray/config.py for the keys"
        raise ConfigError(f"{spec._source}: {field}: unknown run-config key '{path}': {fix}")
    ann = info.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        child = next(iter(ann.model_fields))
        raise ConfigError(f"{spec._source}: {field}: '{path}' is a section: name a key in it, "
                          f"e.g. '{path}.{child}'")
    if path in RESOURCE_PATHS:
        raise ConfigError(f"{spec._source}: {field}: '{path}' is set per trial by resources: "
                          f"set {RESOURCE_PATHS[path]} instead")


def _check(spec: SweepSpec, base_source: str) -> None:
    """Everything pydantic cannot see alone: paths into the run config, joint keys, the
    searcher's kinds, and (in _check_values) the values themselves."""
    src = spec._source
    base = _validate_run(spec.base, base_source, spec._check_paths)
    r, d = spec.resources, base.distributed
    r.workers = r.workers or d.workers
    r.cpus_per_worker = r.cpus_per_worker or d.cpus_per_worker
    if r.gpus_per_worker is None:
        r.gpus_per_worker = (d.gpus_per_worker or 1.0) if d.use_gpu else 0.0
    if r.gpus_per_worker > 1 and r.gpus_per_worker != int(r.gpus_per_worker):
        raise ConfigError(f"{src}: field 'resources.gpus_per_worker': {r.gpus_per_worker:g}: Ray takes a "
                          "fraction below 1 or a whole number of GPUs: use e.g. 0.5, 1 or 2")
    r.placement_strategy = r.placement_strategy or d.placement_strategy
    f = spec.failures
    if f.worker_restarts is None:
        f.worker_restarts = d.max_failures if "max_failures" in (spec.base.get("distributed") or {}) \
            else DEFAULT_WORKER_RESTARTS
    for path in spec.fixed:
        _check_path(spec, f"fixed.{path}", path)
    seen: dict[str, str] = {}
    for key, dist in spec.space.items():
        paths, field = _paths(key), f"{src}: field 'space.{key}'"
        for path in paths:
            _check_path(spec, f"space.{key}", path)
            if path in spec.fixed or path in seen:
                other = f"fixed.{path}" if path in spec.fixed else f"space.{seen[path]}"
                raise ConfigError(f"{field}: '{path}' is also set by {other}: keep one")
            seen[path] = key
        if len(paths) > 1 and dist.kind not in ("choice", "grid"):
            raise ConfigError(f"{field}: a joint key takes choice or grid only")
        for value in dist.values if len(paths) > 1 else ():
            if not isinstance(value, list) or len(value) != len(paths):
                raise ConfigError(f"{field}: value {value!r} must be a list of {len(paths)} "
                                  f"values, one per path ({', '.join(paths)})")
        info = _field(paths[0])
        ann = typing.get_args(info.annotation) or (info.annotation,)
        if dist.kind in ("uniform", "loguniform") and int in ann and float not in ann:
            raise ConfigError(f"{field}: '{key}' is a whole number: use {{int: [low, high]}} "
                              "or {choice: [...]}")
    kinds = {dist.kind for dist in spec.space.values()}
    if spec.searcher.type is None:
        spec.searcher.type = "grid" if kinds <= {"grid"} else "optuna"
    for key, dist in spec.space.items():
        field = f"{src}: field 'space.{key}'"
        if spec.searcher.type == "optuna" and dist.kind == "grid":
            raise ConfigError(f"{field}: grid cannot be used with searcher optuna (Ray's OptunaSearch "
                              "has no grid search): use choice, or searcher grid / random")
        if spec.searcher.type == "grid" and dist.kind != "grid":
            raise ConfigError(f"{field}: searcher grid takes grid entries only (got {dist.kind}): "
                              "write {grid: [...]} or use searcher random / optuna")
        if spec.searcher.type == "random" and spec.repeats > 1 and dist.kind != "grid":
            raise ConfigError(f"{src}: field 'repeats': searcher random draws {key} anew for every "
                              "seed: use searcher optuna (repeats the same values) or grid entries")
    _check_values(spec)


def _check_values(spec: SweepSpec) -> None:
    """Build a RunConfig for each value alone, then for every combination of the values a
    trial can get (each choice/grid value, both bounds of a range)."""
    src, check = spec._source, spec._check_paths
    problem = _problem(_trial_data(spec, {}), check)
    if problem:
        raise ConfigError(f"{src}: field 'fixed': base + fixed + resources are rejected by the "
                          f"run config ({problem[0]}): fix the value")
    task = spec.metric.split("/")[1] if spec.metric.startswith("eval/") else None
    cfg = RunConfig.model_validate(_trial_data(spec, {}))
    if task == "heldout":
        h = cfg.eval.heldout
        embedded = h.files is None and any(f in EMBEDDED_MIXES for f in cfg.data.train_files)
        if not (embedded or h.files or h.fraction > 0):
            raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: name held-out "
                              "files (eval: {heldout: {files: [...]}}) or keep a fraction of the training "
                              "rows out (eval: {heldout: {fraction: 0.1}})")
    elif task and task not in cfg.eval.tasks:
        raise ConfigError(f"{src}: field 'metric': {spec.metric} is never measured: add {task} to "
                          f"the base's eval.tasks (eval: {{tasks: [{task}]}})")
    for key, dist in spec.space.items():
        for value in dist.values:
            problem = _problem(_trial_data(spec, {key: value}), check)
            if problem and problem[1]:  # a field error; model-level ones may need other keys
                raise ConfigError(f"{src}: field 'space.{key}': value {value!r} is rejected by the "
                                  f"run config ({problem[0]}): change or remove it")
    keys, values = list(spec.space), [d.values for d in spec.space.values()]
    if math.prod(map(len, values)) > MAX_COMBINATIONS:
        values = [v[:1] for v in values]  # too many: the first trial only
    for combo in itertools.product(*values):
        point = dict(zip(keys, combo))
        problem = _problem(_trial_data(spec, point), check)
        if problem:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"{src}: field 'space': the trial {{{shown}}} is rejected by the run "
                              f"config ({problem[0]}): draw dependent paths together in one joint "
                              "key ('a, b': {grid: [[a1, b1], ...]}) or change the values")


def _problem(data: dict, check_paths: bool) -> tuple[str, bool] | None:
    """(message, is a field error) if the run config rejects ``data``, else None."""
    try:
        RunConfig.model_validate(data)
    except ValidationError as exc:
        return format_validation_error(exc), any(e["loc"] for e in exc.errors())
    if check_paths:
        try:
            build_run_config(data, "run")
        except ConfigError as exc:
            return str(exc).removeprefix("run: "), True
    return None


def _validate_run(data: dict, source: str, check_paths: bool) -> RunConfig:
    if check_paths:
        return build_run_config(data, source)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def _trial_data(spec: SweepSpec, params: dict[str, Any]) -> dict:
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
        paths = _paths(key)
        out.update(zip(paths, value) if len(paths) > 1 else [(key, value)])
    return out


# ---------------------------------------------------------------------------- use


def tune_param_space(spec: SweepSpec) -> dict[str, object]:
    """Flat ``{space key: Ray Tune domain}``; ``int`` is inclusive, so randint(lo, hi + 1)."""
    from ray import tune  # here, not at import: loading and validating a sweep stays fast

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "int": lambda v: tune.randint(v[0], v[1] + 1)}
    space = {key: make[d.kind](copy.deepcopy(d.values)) for key, d in spec.space.items()}
    if spec.repeats > 1 and spec.searcher.type != "optuna":  # optuna: tune.py's Repeater sets it
        space[TRIAL_INDEX] = tune.grid_search(list(range(spec.repeats)))
    return space


def trial_run_config(spec: SweepSpec, trial_params: dict[str, object], name: str | None = None) -> RunConfig:
    """The validated RunConfig of one trial: base + fixed + resources + its sampled values."""
    data = _trial_data(spec, trial_params)
    if name:
        data["name"] = name
    return _validate_run(data, f"{spec._source}: trial {name or trial_params}", spec._check_paths)


def trial_points(spec: SweepSpec, touching: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Space points covering every value a trial can get: none (base + fixed), each value alone
    (both bounds of a range), then every combination of the entries with a path under one of
    ``touching`` (all entries if empty); beyond MAX_COMBINATIONS, the first value of each."""
    def touches(key: str) -> bool:
        return not touching or any(p == t or p.startswith(t + ".") for p in _paths(key) for t in touching)

    keys = [key for key in spec.space if touches(key)]
    points = [{}] + [{key: value} for key in keys for value in spec.space[key].values]
    values = [spec.space[key].values for key in keys]
    if math.prod(map(len, values)) > MAX_COMBINATIONS:
        values = [v[:1] for v in values]
    if len(keys) > 1:
        points += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return points


def trial_count(spec: SweepSpec) -> int:
    """Trials Ray Tune will run: num_samples (optuna) or num_samples x the grid's size, x repeats."""
    if spec.searcher.type == "optuna":
        return spec.num_samples * spec.repeats
    grid = math.prod(len(d.values) for d in spec.space.values() if d.kind == "grid")
    return spec.num_samples * grid * spec.repeats


def describe(spec: SweepSpec) -> str:
    """A few lines for ``--dry-run``: what will run, before anything does."""
    s, r, sch = spec.searcher, spec.resources, spec.scheduler
    sched = "none" if sch.type == "none" else (f"asha (grace {sch.grace_period}, reduction "
                                               f"{sch.reduction_factor:g}, max_t {sch.max_t or 'default'})")
    lines = [f"sweep {spec.name}: {trial_count(spec)} trials, {spec.max_concurrent} at a time; "
             f"{spec.mode} {spec.metric}",
             f"searcher {s.type} (seed {s.seed}), num_samples {spec.num_samples}, repeats "
             f"{spec.repeats}; scheduler {sched}",
             f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU, "
             f"placement {r.placement_strategy}; on failure: {spec.failures.worker_restarts} worker-group "
             f"restart(s), {spec.failures.trial_retries} trial retry(ies)"]
    for key, d in spec.space.items():
        if "," in key:  # a joint key: one table row per line
            lines += [f"  {key}: {d.kind}"] + [f"    {_flow(v)}" for v in d.values]
        else:
            lines.append(f"  {key}: {d.kind} {_flow(d.values)}")
    lines += [f"  {key} = {_flow(v)}" for key, v in spec.fixed.items()]
    return "\n".join(lines)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
