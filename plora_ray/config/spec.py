"""The schema of ``search_spaces/*.yaml``: a sweep as a typed object (:class:`SweepSpec`).

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
``num_samples`` counts trials for optuna and repeats of the grid otherwise. ``mode`` defaults to
the metric's direction (:func:`plora_ray.config.names.direction`: min for a loss, else max).

Reading a file and checking it against the run config is :mod:`plora_ray.config.sweep`.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from plora_ray.config.names import METRICS, direction, harness_metric_task
from plora_ray.config.strict import Strict

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


class Distribution(Strict):
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


class Searcher(Strict):
    type: Literal["optuna", "random", "grid"] | None = Field(
        None, description="optuna (seeded TPE) | random | grid; default grid if every space "
        "entry is a grid, else optuna")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="searcher seed (numpy's range: 0 to 2**32 - 1)")


class Scheduler(Strict):
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


class Resources(Strict):
    """Per trial; written into the run's ``distributed`` section. Unset: the base's values."""

    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="> 0 sets distributed.use_gpu; a "
                                          "fraction below 1 shares a GPU (0.5: two workers per GPU)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="placement of a trial's workers (STRICT_PACK: one node per trial)")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of one of the cluster's GPUs, GiB as nvidia-smi's MiB / 1024 "
        "(A100-80GB: 80, A100-40GB: 40); before Ray starts, every trial's estimated peak per GPU "
        "(plora_ray.run.memory) must fit it; null: the GPUs this machine has (none: not checked)")


class Failures(Strict):
    """What a sweep does when something dies; unset: the defaults below."""

    trial_retries: int = Field(1, ge=-1, description="Tune reruns a failed trial (its driver-side "
                               "function died, or its workers ran out of restarts) from its last "
                               "checkpoint this many times; -1: without limit")
    worker_restarts: int | None = Field(None, ge=-1, description="Train restarts a trial's worker group "
                                        "from the last checkpoint when a worker or its node is lost "
                                        "(a one-worker trial, trained in its Tune function: Tune "
                                        "restarts it, up to trial_retries + this many times) "
                                        f"(distributed.max_failures); default: the base's, else "
                                        f"{DEFAULT_WORKER_RESTARTS}; -1: without limit")


class SweepSpec(Strict):
    name: str | None = Field(None, description="sweep name; default the file's stem")
    base: dict[str, Any] = Field(description="run config (a path in the file is read first)")
    metric: str
    mode: Literal["min", "max"] | None = Field(None, description="default: min for a loss (train/loss, "
                                               "eval/heldout/loss), a perplexity or bits_per_byte, "
                                               "else max")
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
        if value not in METRICS and harness_metric_task(value) is None:  # harness: see trials.py
            hint = difflib.get_close_matches(value, METRICS, n=1, cutoff=0.4)
            raise ValueError(f"unknown metric: did you mean '{hint[0]}'?" if hint
                             else f"unknown metric: use one of {', '.join(METRICS)}")
        return value

    @model_validator(mode="after")
    def _default_mode(self) -> "SweepSpec":
        if self.mode is None:
            self.mode = direction(self.metric)
        return self
