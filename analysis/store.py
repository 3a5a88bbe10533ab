"""Reading a sweep back through `mlflow.MlflowClient` (the layout of docs/tracking_layout.md).

Nothing here touches files behind MLflow's back: runs come from `search_runs` (paged), curves
from `get_metric_history` (which pages the store itself), per-item results from
`download_artifacts`, one checkpoint at a time and only when a comparison needs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from unittest import mock
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RUN_TYPE = "plora.run_type"
PARENT = "mlflow.parentRunId"
STATUS = "plora.status"
TRIAL_ID = "plora.trial_id"
CONFIG_ID = "plora.config_id"
SEED = "plora.seed"
SPACE_PREFIX = "space."
# searched values that name a repeat, not a configuration
SEED_KEYS = ("seed", "space.seed")


class AnalysisError(Exception):
    """Bad input (unknown experiment / run): reported as one line by the CLI."""


def client_for(tracking_uri: str):
    """A client on an existing store: a missing SQLite file is an error here, not a new
    empty database created as a side effect of reading."""
    uri = str(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path not in ("", ":memory:") and not Path(path).exists():
            raise AnalysisError(f"--tracking-uri: no MLflow database at {Path(path).resolve()} "
                                "(give the store the sweep wrote, e.g. sqlite:////abs/mlflow.db)")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _is_locked_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def retry(fn, *args, attempts: int = 6, **kwargs):
    """Call ``fn``; retry SQLite "database is locked" errors (several processes, one file)."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException wraps sqlalchemy's OperationalError
            if attempt == attempts - 1 or not _is_locked_error(exc):
                raise
            log.warning("MLflow store busy (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


@contextlib.contextmanager
def no_progress_bar():
    """MLflow's artifact-download progress bars off inside the block (its own switch,
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``); the environment is restored as it was after."""
    with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
        yield


def search_all(client, experiment_ids, filter_string: str = "") -> list:
    """Every run matching ``filter_string`` (``search_runs``, paged 1000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def sweep_trials(tracking_uri: str, parent_run_id: str, client=None) -> list[dict]:
    """The trial runs under a sweep run, oldest first: dicts with ``run_id``, ``trial_id``,
    ``name``, ``status`` (plora.status), ``mlflow_status``, ``config_id``, ``seed``, ``space``
    (the searched values as tagged), ``tags``, ``params``, ``metrics`` (latest values)."""
    client = client or client_for(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = search_all(client, [experiment_id], f"tags.`{PARENT}` = '{parent_run_id}'")
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_ID), "name": r.info.run_name,
             "status": r.data.tags.get(STATUS), "mlflow_status": r.info.status,
             "config_id": r.data.tags.get(CONFIG_ID), "seed": r.data.tags.get(SEED),
             "space": {k[len(SPACE_PREFIX):]: v for k, v in r.data.tags.items() if k.startswith(SPACE_PREFIX)},
             "tags": dict(r.data.tags), "params": dict(r.data.params), "metrics": dict(r.data.metrics)}
            for r in runs]


def parse_value(text: str):
    """A searched value back from its tag/param text: int, float, bool or the string."""
    if text is None or text in ("None", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    return text


def lower_is_better(metric_key: str, sweep: "Sweep | None" = None) -> bool:
    """Whether a smaller value of ``metric_key`` is better: the sweep's recorded mode
    (``plora.mode`` on its run) for the sweep's own metric, else by name (loss, perplexity,
    error)."""
    if sweep is not None and metric_key == sweep.metric and sweep.mode in ("min", "max"):
        return sweep.mode == "min"
    name = metric_key.rsplit("/", 1)[-1]
    return "loss" in name or "perplexity" in name or name.endswith("error")


@dataclass
class Trial:
    """One trial run, with lazily fetched curves and per-item results (cached)."""

    client: object = field(repr=False)
    run: object = field(repr=False)
    _history: dict = field(default_factory=dict, repr=False)
    _items: dict = field(default_factory=dict, repr=False)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run_id[:8]

    @property
    def tags(self) -> dict:
        return self.run.data.tags

    @property
    def params(self) -> dict:
        return self.run.data.params

    @property
    def status(self) -> str:
        return self.tags.get(STATUS) or self.run.info.status.lower()

    @property
    def running(self) -> bool:
        # the producer's tag decides; MLflow's own status only for runs without one
        if STATUS in self.tags:
            return self.tags[STATUS] == "running"
        return self.run.info.status == "RUNNING"

    @cached_property
    def space(self) -> dict:
        """The searched values (tags `space.<path>`); without them, the run's params."""
        values = {k[len(SPACE_PREFIX):]: parse_value(v) for k, v in self.tags.items()
                  if k.startswith(SPACE_PREFIX)}
        return values

    @property
    def seed(self):
        if "plora.seed" in self.tags:
            return parse_value(self.tags["plora.seed"])
        return parse_value(self.params.get("seed"))

    def param(self, key: str):
        if key in self.space:
            return self.space[key]
        return parse_value(self.params.get(key))

    @property
    def metric_keys(self) -> list[str]:
        return list(self.run.data.metrics)

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metric, sorted by step; the last value logged at a step wins."""
        if key not in self._history:
            if key not in self.run.data.metrics:
                self._history[key] = ([], [])
            else:
                by_step = {}
                for m in sorted(self.client.get_metric_history(self.run_id, key),
                                key=lambda m: (m.step, m.timestamp)):
                    by_step[m.step] = m.value
                steps = sorted(by_step)
                self._history[key] = (steps, [by_step[s] for s in steps])
        return self._history[key]

    def value_at(self, key: str, step: int) -> float:
        steps, values = self.history(key)
        for s, v in zip(steps, values):
            if s == step:
                return v
        return math.nan

    def samples_at(self, step: int) -> float:
        """Training samples at `step` (eval/samples, else train/samples, else nan)."""
        value = self.value_at("eval/samples", step)
        if math.isnan(value):
            steps, values = self.history("train/samples")
            if steps and steps[0] <= step <= steps[-1]:  # logged every few steps: interpolate
                value = float(np.interp(step, steps, values))
        return value

    def items(self, step: int) -> dict | None:
        """Per-item results at checkpoint `step` (artifact items/step_<step:07d>.json) or None."""
        if step not in self._items:
            path = f"items/step_{int(step):07d}.json"
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    local = self.client.download_artifacts(self.run_id, path, tmp)
                    self._items[step] = json.loads(Path(local).read_text())
            except Exception:  # absent artifact: MLflow raises its own error types per store
                self._items[step] = None
        return self._items[step]


@dataclass
class Sweep:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent: object | None       # the sweep run (None: a plain experiment of trial runs)
    trials: list[Trial]
    client: object = field(repr=False)

    @property
    def metric(self) -> str | None:
        if self.parent is None:
            return None
        metric = self.parent.data.tags.get("plora.metric")
        return metric if metric else None

    @property
    def mode(self) -> str | None:
        return self.parent.data.tags.get("plora.mode") if self.parent is not None else None

    @property
    def running(self) -> bool:
        parent_running = self.parent is not None and self.parent.info.status == "RUNNING"
        return parent_running or any(t.running for t in self.trials)


def load_sweep(tracking_uri: str, experiment: str, sweep_run_id: str | None = None) -> Sweep:
    """The sweep `sweep_run_id` (default: the latest sweep run of `experiment`) and its trials.

    An experiment without a sweep run is read as one: every run in it is a trial.
    """
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise AnalysisError(f"--experiment: no experiment named {experiment!r} in {tracking_uri} "
                            "(list them in the MLflow UI or with `mlflow experiments search`)")
    parent = None
    if sweep_run_id:
        try:
            parent = client.get_run(sweep_run_id)
        except Exception:
            raise AnalysisError(f"--sweep: no run {sweep_run_id!r} in {tracking_uri}") from None
        if parent.info.experiment_id != exp.experiment_id:
            raise AnalysisError(f"--sweep: run {sweep_run_id} is not in experiment {experiment!r}")
    else:
        sweeps = search_all(client, [exp.experiment_id], f"tags.`{RUN_TYPE}` = 'sweep'")
        if sweeps:
            parent = max(sweeps, key=lambda r: r.info.start_time or 0)
    if parent is not None:
        runs = search_all(client, [exp.experiment_id],
                          f"tags.`{PARENT}` = '{parent.info.run_id}'")
    else:
        runs = [r for r in search_all(client, [exp.experiment_id])
                if r.data.tags.get(RUN_TYPE) != "sweep"]
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return Sweep(str(tracking_uri), experiment, exp.experiment_id, parent,
                 [Trial(client, r) for r in runs], client)


def load_run(tracking_uri: str, run_id: str, client=None) -> Trial:
    client = client or client_for(tracking_uri)
    try:
        return Trial(client, client.get_run(run_id))
    except Exception:
        raise AnalysisError(f"no run {run_id!r} in {tracking_uri}") from None
