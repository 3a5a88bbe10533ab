"""Rank 0 of a trial: its curves and artifacts into the trial's run (made by the driver,
``tracking.driver.trial_run``), metrics through MLflow's asynchronous ``log_batch``; no duplicate
steps after a restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from analysis.store import retry
from plora_ray.tracking.driver import TrialRecord, mlflow_client
from plora_ray.tracking.naming import sanitize_key

log = logging.getLogger(__name__)


class RunLogger:
    """Metrics and artifacts into one run, metrics through MLflow's asynchronous ``log_batch``.

    A resumed trial re-runs the steps between its last checkpoint and the failure: with
    ``skip_logged_steps`` (default) a metric is not logged at a step at or below the last step
    the run already had for that key when this logger was created, so curves keep one point per
    step. ``flush()`` waits until everything logged is stored (call it in a ``finally``).
    """

    def __init__(self, tracking_uri: str, run_id: str, skip_logged_steps: bool = True):
        self.run_id = run_id
        self._client = mlflow_client(tracking_uri)
        self._pending: list = []  # (metrics, RunOperations) not yet known to be stored
        self._stored = set(self._client.get_run(run_id).data.metrics) if skip_logged_steps else set()
        self._last_step: dict[str, int | None] = {}

    def last_value(self, key: str) -> float | None:
        """The value at the highest step the run had for ``key`` when this logger started."""
        if key not in self._stored:
            return None
        history = self._client.get_metric_history(self.run_id, key)
        return max(history, key=lambda m: (m.step, m.timestamp)).value if history else None

    def _already_logged(self, key: str, step: int) -> bool:
        if key not in self._stored:
            return False
        if key not in self._last_step:
            history = self._client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=None)
        last = self._last_step[key]
        return last is not None and step <= last

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue ``metrics`` at ``step`` (None / non-numeric values are skipped; NaN and inf are
        kept: a diverging loss shows as such)."""
        from mlflow.entities import Metric

        timestamp, batch = int(time.time() * 1000), []
        for name, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                continue
            key = sanitize_key(name)
            if not self._already_logged(key, int(step)):
                batch.append(Metric(key, number, timestamp, int(step)))
        if batch:
            self._pending.append((batch, self._client.log_batch(self.run_id, metrics=batch,
                                                                synchronous=False)))

    def log_unload(self, stage: int, step: int, samples: int, ranks: Mapping[str, int], seconds: float,
                   output_change: float | None = None) -> None:
        """An unload: ``plora/stage``, ``plora/accumulated_rank`` (mean over layers), ``_min``,
        ``_max``, ``plora/unload_seconds`` (``plora/output_change`` if measured) as metrics; the
        per-layer ranks as one table artifact ``ranks/unload_<stage:04d>.json``."""
        values = list(ranks.values()) or [0]
        metrics = {"plora/stage": stage, "plora/accumulated_rank": sum(values) / len(values),
                   "plora/accumulated_rank_min": min(values), "plora/accumulated_rank_max": max(values),
                   "plora/unload_seconds": seconds, "plora/output_change": output_change}
        self.log_metrics(metrics, step)
        self.log_dict({"stage": stage, "step": step, "samples": samples, "ranks": dict(ranks)},
                      f"ranks/unload_{stage:04d}.json")

    def log_items(self, step: int, samples: int, tasks: Mapping[str, Any]) -> None:
        """Per-item results of a checkpoint (``tasks`` as in docs/tracking_layout.md) as artifact
        ``items/step_<step:07d>.json``."""
        self.log_dict({"step": step, "samples": samples, "tasks": dict(tasks)}, f"items/step_{step:07d}.json")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        retry(self._client.log_dict, self.run_id, dict(data), artifact_file)

    def flush(self) -> None:
        """Wait for every queued batch; one that failed (a busy SQLite file) is written again."""
        pending, self._pending = self._pending, []
        for batch, operation in pending:
            try:
                operation.wait()
            except Exception as exc:
                log.warning("asynchronous MLflow logging failed (%s); logging again", exc)
                retry(self._client.log_batch, self.run_id, metrics=batch, synchronous=True)

    close = flush

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


class TrialTracker:
    """Rank 0's MLflow logging for a trial (``config["tracking"]``: a :class:`TrialRecord`); a
    no-op on other ranks and without tracking. A restarted worker group re-runs the steps after
    its last checkpoint: the logger skips steps the run already has, and ``time/elapsed_s``
    continues from the last value logged."""

    def __init__(self, tracking: TrialRecord | None, rank: int):
        self.logger = RunLogger(tracking.uri, tracking.run_id) if tracking and rank == 0 else None
        self._unloads = []  # unload events whose ranks are still being measured
        self._t0 = time.monotonic() - ((self.logger.last_value("time/elapsed_s") or 0.0) if self.logger else 0.0)

    def trainable_params(self, count: int) -> None:
        if self.logger:
            self.logger.log_metrics({"model/trainable_params": count}, 0)

    def step(self, rec: dict) -> None:
        self._log_unloads()
        if self.logger:
            self.logger.log_metrics({"train/loss": rec["loss"], "train/lr": rec["lr"],
                                     "train/samples": rec["samples"], "train/tokens_per_s": rec["tokens_per_s"],
                                     "time/elapsed_s": time.monotonic() - self._t0}, rec["step"])

    def unload(self, e) -> None:
        """Logged once its ranks (measured in the background) are there, at its own step."""
        if self.logger:
            self._unloads.append(e)
            self._log_unloads()

    def _log_unloads(self, wait: bool = False) -> None:
        while self._unloads and (wait or self._unloads[0].ranks_ready):
            e = self._unloads.pop(0)
            self.logger.log_unload(e.stage, e.step, e.samples, e.ranks, e.seconds, e.output_change)

    def metrics(self, metrics: dict, step: int, samples: int | None = None) -> None:
        """A checkpoint's scores at ``step``; with ``samples`` (the training samples so far)
        also ``eval/samples`` where something was scored."""
        self._log_unloads(wait=True)
        if self.logger:
            if metrics and samples is not None:
                metrics = {**metrics, "eval/samples": samples}
            self.logger.log_metrics(metrics, step)
            self.logger.flush()  # a checkpoint: the driver and the UI see it now

    def phases(self, timings: dict, step: int) -> None:
        """Wall seconds per phase of the trial (``phase/<name>_s``: train_start, model_load,
        tokenise, engine, steps, unload, evaluation, checkpoint): call once, when its training
        has ended (its last checkpoint included)."""
        if self.logger and timings:
            self.logger.log_metrics({f"phase/{k}_s": float(v) for k, v in timings.items()}, step)
            self.logger.flush()

    def items(self, step: int, samples: int, tasks: dict) -> None:
        if self.logger and tasks:
            self.logger.log_items(step, samples, tasks)

    def flush(self) -> None:
        self._log_unloads(wait=True)
        if self.logger:
            self.logger.flush()


__all__ = ["RunLogger", "TrialTracker"]
