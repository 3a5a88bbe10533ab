"""Reading a sweep file: ``load_sweep`` reads, overrides and checks it into a :class:`SweepSpec`.

    python -m plora_ray.tune search_spaces/unload.yaml [--set num_samples=2 --set base.data.max_steps=4]

The schema is :mod:`plora_ray.config.spec`. Everything is checked before a trial starts: each
value a trial can get (every choice and grid value, both bounds of a range) is built into a
RunConfig, alone and in every combination (up to ``MAX_COMBINATIONS``), so ``m = 1`` or a typo
fails in a second with one line naming the field, not an hour into the sweep
(:mod:`plora_ray.config.trials` builds them). The translation to Ray Tune is
:mod:`plora_ray.sweep.space`; nothing here imports Ray.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from plora_ray.config.io import apply_override, format_validation_error, nearest_key, parse_override, read_yaml
from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.config.spec import DEFAULT_WORKER_RESTARTS, RESOURCE_PATHS, SweepSpec
from plora_ray.config.trials import check_values, key_paths, validate_run

def load_sweep(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> SweepSpec:
    """Read, override (``key=value``; ``space.<path>=null`` drops an entry) and validate a
    sweep file; raises ConfigError (one line). ``check_paths=False`` skips the existence
    checks of model and data paths (the paper-scale files on a machine without them)."""
    path = Path(path)
    data = read_yaml(path)
    run_keys = sorted(set(data) & (set(RunConfig.model_fields) - set(SweepSpec.model_fields)))
    if "base" not in data and run_keys:
        raise ConfigError(f"{path}: a run config (keys {', '.join(run_keys)}), not a sweep file: train it "
                          f"with python -m plora_ray.train {path}, or name it as a sweep's base "
                          f"(base: {path.name})")
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
        fix = f"did you mean '{hint}'?" if hint else "see plora_ray/config/schema.py for the keys"
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
    base = validate_run(spec.base, base_source, spec._check_paths)
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
        paths, field = key_paths(key), f"{src}: field 'space.{key}'"
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
    check_values(spec)

