"""MLflow tracking for sweeps: one parent run per sweep, one nested run per trial.

Everything goes through ``mlflow.MlflowClient(tracking_uri=...)``: no global MLflow state is
touched (``mlflow.set_tracking_uri`` / ``mlflow.start_run`` are never called), so several stores
can be used in one process and a Ray worker needs only the URI and a run id. ``mlflow`` is
imported lazily (about 1 s) the first time a function here talks to a store.

Layout of a sweep in the store::

    experiment <name>            artifact location <store dir>/mlartifacts (created by the driver)
      run <sweep name>           tags plora.run_type=sweep, git commit, package versions;
                                 artifact search_space/<file>; after finish_sweep: summary.* params
        run <trial name>         tags mlflow.parentRunId, plora.trial_id, plora.status;
                                 params: the trial config flattened ("lora.rank");
                                 metrics: train/*, plora/*, eval/* per step

Who writes what: the driver calls ``ensure_experiment``, ``start_sweep_run``, ``trial_run``
(idempotent per trial id, so a restarted or resumed trial continues its run),
``set_trial_status`` and ``finish_sweep``; the rank-0 worker of a trial logs its curves with a
``RunLogger`` (buffered ``log_batch`` calls).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

# Tag keys written by this module.
TAG_RUN_TYPE = "plora.run_type"          # "sweep" | "trial"
TAG_SWEEP = "plora.sweep"
TAG_TRIAL_ID = "plora.trial_id"
TAG_TRIAL_NAME = "plora.trial_name"
TAG_STATUS = "plora.status"
TAG_GIT_COMMIT = "plora.git_commit"
TAG_GIT_DIRTY = "plora.git_dirty"
TAG_PARENT = "mlflow.parentRunId"        # MLflow's own nesting tag (the UI groups by it)

# plora.status -> MLflow run status
TRIAL_STATUSES = {
    "finished": "FINISHED",
    "stopped_early": "KILLED",   # stopped by the scheduler (ASHA): a normal, incomplete end
    "diverged": "FAILED",        # non-finite loss
    "failed": "FAILED",          # an exception / exhausted restarts
}

# MLflow limits (mlflow.utils.validation, MLflow 3.17).
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

VERSIONED_PACKAGES = ("ray", "peft", "torch", "transformers", "deepspeed", "mlflow", "plora-ray")

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")


# ----------------------------------------------------------------------------- helpers


def _client(tracking_uri: str):
    from mlflow import MlflowClient  # lazy: importing mlflow costs about 1 s

    return MlflowClient(tracking_uri=str(tracking_uri))


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute with four slashes), else None."""
    uri = str(tracking_uri)
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).resolve()  # a relative path is relative to the working directory


def sanitize_key(name: str) -> str:
    """Turn ``name`` into a metric/param key MLflow accepts.

    MLflow allows alphanumerics, ``_ - . / space :``; the key must not change under
    ``posixpath.normpath`` (no leading/trailing/double ``/``, no ``.``/``..`` segments) and is at
    most 250 characters. Other characters become ``_``.
    """
    key = _BAD_KEY_CHARS.sub("_", str(name))
    parts = []
    for part in key.split("/"):
        if part == "":
            continue
        if part in (".", ".."):
            part = part.replace(".", "_")
        parts.append(part)
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        import hashlib

        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = key[: MAX_KEY_LENGTH - 9].rstrip("/") + "~" + digest
    return key


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, Path):
        text = str(value)
    elif isinstance(value, (list, tuple, set)):
        try:
            text = json.dumps(list(value), default=str)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    return _truncate(text, MAX_PARAM_VALUE_LENGTH)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys (``{"lora": {"rank": 8}}`` -> ``{"lora.rank": "8"}``).

    Leaves are stringified (lists as JSON), keys sanitized, values cut to MLflow's 6000
    characters. An empty nested dict is kept as ``"{}"``.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic models
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, full))
        elif isinstance(value, Mapping):
            out[sanitize_key(full)] = "{}"
        else:
            out[sanitize_key(full)] = _param_value(value)
    return out


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_locked_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def _retry(fn, *args, attempts: int = 6, **kwargs):
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
    raise AssertionError("unreachable")


def _quote(value: str) -> str | None:
    """A quoted literal for an MLflow search filter, or None if it cannot be quoted."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def git_commit(path: str | Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding ``path`` (default: this package's source,
    then the working directory); ``("unknown", None)`` outside a git repository."""
    candidates = [Path(path)] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]
    for where in candidates:
        where = where if where.is_dir() else where.parent
        try:
            commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                                    capture_output=True, text=True, timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                     "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
            return commit.stdout.strip(), dirty
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", None


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (from package metadata: nothing is imported)."""
    from importlib import metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------------------- public API


def default_tracking_uri(directory: str | Path) -> str:
    """``sqlite:////abs/<directory>/mlflow.db`` (four slashes: an absolute path)."""
    path = (Path(directory).expanduser().resolve() / DEFAULT_DB).as_posix()
    return "sqlite:///" + path  # path starts with "/", hence four slashes


def ensure_experiment(tracking_uri: str, name: str,
                      artifact_root: str | Path | None = None) -> str:
    """The id of experiment ``name``, created if missing (call from the driver).

    For a SQLite store the artifact location defaults to ``<db dir>/mlartifacts`` (an absolute
    path: an experiment created with MLflow's default inside a Ray worker would get one in Ray's
    temporary session directory). For a server store the server chooses unless ``artifact_root``
    is given. A deleted experiment of that name is restored.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    if artifact_root is None:
        db = _sqlite_path(tracking_uri)
        if db is not None:
            artifact_root = db.parent / DEFAULT_ARTIFACT_DIR
    location = None
    if artifact_root is not None:
        root = str(artifact_root)
        if "://" not in root:
            root_path = Path(root).expanduser().resolve()
            root_path.mkdir(parents=True, exist_ok=True)
            root = root_path.as_posix()
        location = root
    try:
        return _retry(client.create_experiment, name, artifact_location=location)
    except MlflowException as exc:  # created concurrently by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_sweep_run(tracking_uri: str, experiment_id: str, sweep_name: str,
                    space_file: str | Path | None = None,
                    tags: Mapping[str, Any] | None = None) -> str:
    """Create the sweep's parent run and return its id.

    Tags: ``plora.run_type=sweep``, ``plora.sweep``, ``plora.git_commit`` (+ MLflow's
    ``mlflow.source.git.commit``; "unknown" outside git), ``plora.git_dirty``,
    ``plora.version.<pkg>`` for python/ray/peft/torch/transformers/deepspeed/mlflow/plora-ray,
    plus ``tags``. ``space_file`` is logged as artifact ``search_space/<name>``.
    """
    commit, dirty = git_commit()
    all_tags = {
        TAG_RUN_TYPE: "sweep",
        TAG_SWEEP: sweep_name,
        TAG_GIT_COMMIT: commit,
        "mlflow.source.git.commit": commit,
    }
    if dirty is not None:
        all_tags[TAG_GIT_DIRTY] = str(dirty).lower()
    for package, version in package_versions().items():
        all_tags[f"plora.version.{package}"] = version
    if space_file is not None:
        all_tags["plora.space_file"] = str(Path(space_file).resolve())
    for key, value in (tags or {}).items():
        all_tags[sanitize_key(key)] = _truncate(str(value), MAX_TAG_VALUE_LENGTH)

    client = _client(tracking_uri)
    run = _retry(client.create_run, experiment_id, tags=all_tags, run_name=sweep_name)
    run_id = run.info.run_id
    if space_file is not None:
        _retry(client.log_artifact, run_id, str(space_file), artifact_path="search_space")
    return run_id


def _find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    quoted = _quote(trial_id)
    if quoted is not None:
        runs = _search_all(client, [experiment_id],
                           f"tags.`{TAG_PARENT}` = '{parent_run_id}' and "
                           f"tags.`{TAG_TRIAL_ID}` = {quoted}")
    else:
        runs = [r for r in _search_all(client, [experiment_id],
                                       f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
                if r.data.tags.get(TAG_TRIAL_ID) == trial_id]
    runs.sort(key=lambda r: r.info.start_time or 0)
    return runs[0] if runs else None


def _log_params_once(client, run, params: Mapping[str, Any]) -> None:
    """Log the params the run does not have yet; a key logged before keeps its first value."""
    flat = flatten_params(params)
    existing = run.data.params
    from mlflow.entities import Param

    fresh = []
    for key, value in flat.items():
        if key in existing:
            if existing[key] != value:
                log.warning("run %s: param %r already logged as %r; keeping it (new value %r)",
                            run.info.run_id, key, existing[key], value)
            continue
        fresh.append(Param(key, value))
    for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
        _retry(client.log_batch, run.info.run_id,
               params=fresh[start:start + MAX_PARAMS_TAGS_PER_BATCH])


def trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
              trial_name: str, params: Mapping[str, Any] | None = None) -> str:
    """The run of trial ``trial_id`` under sweep run ``parent_run_id``, created on first call.

    Idempotent: a later call with the same (parent, trial id) — a restarted or resumed trial —
    returns the same run, sets it back to RUNNING if it had ended, and logs only params it does
    not have yet (so re-logging the same params never errors).
    """
    client = _client(tracking_uri)
    trial_id = str(trial_id)
    run = _find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if run is None:
        tags = {
            TAG_PARENT: parent_run_id,
            TAG_RUN_TYPE: "trial",
            TAG_TRIAL_ID: trial_id,
            TAG_TRIAL_NAME: str(trial_name),
            TAG_STATUS: "running",
        }
        parent = client.get_run(parent_run_id)
        for key in (TAG_SWEEP, TAG_GIT_COMMIT, "mlflow.source.git.commit"):
            if key in parent.data.tags:
                tags[key] = parent.data.tags[key]
        run = _retry(client.create_run, experiment_id, tags=tags, run_name=str(trial_name))
    elif run.info.status != "RUNNING":
        _retry(client.update_run, run.info.run_id, status="RUNNING")
        _retry(client.set_tag, run.info.run_id, TAG_STATUS, "running")
        run = client.get_run(run.info.run_id)
    if params:
        _log_params_once(client, run, params)
    return run.info.run_id


class RunLogger:
    """Buffered metric logging into one run (``MlflowClient.log_batch``).

    Used by the rank-0 worker of a trial (it gets ``tracking_uri`` and ``run_id`` in its config)
    and by the driver. Values are buffered and written when ``flush_every`` values are pending,
    when ``flush_seconds`` passed since the last write (so the UI shows live curves), and on
    ``flush()`` / ``close()`` / leaving a ``with`` block.

    A resumed trial re-runs the steps between its last checkpoint and the failure: with
    ``skip_logged_steps`` (default) a metric is not logged at a step at or below the last step
    the run already had for that key when this logger was created, so curves keep one point per
    step. Values logged through this logger are never skipped.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50,
                 flush_seconds: float | None = 10.0, skip_logged_steps: bool = True):
        self.tracking_uri = str(tracking_uri)
        self.run_id = run_id
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = flush_seconds
        self.skip_logged_steps = skip_logged_steps
        self._client = _client(self.tracking_uri)
        self._buffer: list = []
        self._last_flush = time.monotonic()
        # last step of each key the run already had when this logger was created (read lazily)
        self._high_water: dict[str, int | None] = {}
        self._stored_keys: set[str] = set()
        if skip_logged_steps:
            self._stored_keys = set(self._client.get_run(run_id).data.metrics)

    def _last_step(self, key: str) -> int | None:
        if key not in self._stored_keys:
            return None
        if key not in self._high_water:
            history = self._client.get_metric_history(self.run_id, key)
            self._high_water[key] = max((m.step for m in history), default=None)
        return self._high_water[key]

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer ``metrics`` at ``step``; keys are sanitized, None / non-numeric values skipped
        (NaN and inf are kept: a diverging loss shows as such)."""
        from mlflow.entities import Metric

        step = int(step)
        timestamp = _now_ms()
        for name, value in metrics.items():
            number = _to_float(value)
            if number is None:
                continue
            key = sanitize_key(name)
            if self.skip_logged_steps:
                last = self._last_step(key)
                if last is not None and step <= last:
                    continue
            self._buffer.append(Metric(key, number, timestamp, step))
        if len(self._buffer) >= self.flush_every or (
                self.flush_seconds is not None
                and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def log_unload(self, stage: int, step: int, mean_rank: float,
                   ranks_per_layer: Mapping[str, int], seconds: float,
                   output_change: float | None = None) -> None:
        """An unload at ``step``: ``plora/stage``, ``plora/accumulated_rank`` (mean over layers),
        ``plora/accumulated_rank/<layer>`` per layer (names sanitized), ``plora/unload_seconds``
        and, if given, ``plora/output_change``."""
        metrics: dict[str, Any] = {
            "plora/stage": stage,
            "plora/accumulated_rank": mean_rank,
            "plora/unload_seconds": seconds,
        }
        if output_change is not None:
            metrics["plora/output_change"] = output_change
        for layer, rank in ranks_per_layer.items():
            metrics[f"plora/accumulated_rank/{layer}"] = rank
        self.log_metrics(metrics, step)

    def flush(self) -> None:
        """Write every buffered value (in ``log_batch`` calls of at most 1000)."""
        buffer, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        for start in range(0, len(buffer), MAX_METRICS_PER_BATCH):
            chunk = buffer[start:start + MAX_METRICS_PER_BATCH]
            _retry(self._client.log_batch, self.run_id, metrics=chunk)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def set_trial_status(tracking_uri: str, run_id: str, status: str) -> None:
    """Tag ``plora.status`` and end the run: finished → FINISHED, stopped_early → KILLED,
    diverged / failed → FAILED. ``running`` only sets the tag."""
    status = str(status)
    if status != "running" and status not in TRIAL_STATUSES:
        raise ValueError(f"unknown trial status {status!r}: expected one of "
                         f"{', '.join(['running', *TRIAL_STATUSES])}")
    client = _client(tracking_uri)
    _retry(client.set_tag, run_id, TAG_STATUS, status)
    if status != "running":
        _retry(client.set_terminated, run_id, status=TRIAL_STATUSES[status])


def finish_sweep(tracking_uri: str, parent_run_id: str, summary: Mapping[str, Any],
                 status: str = "FINISHED") -> None:
    """Record the sweep's outcome on the parent run and end it.

    ``summary`` (e.g. ``{"best_trial_id", "best_run_id", "metric", "mode", "best_value",
    "best_config", "num_trials"}``) is logged flattened as params ``summary.<key>`` (only the
    keys not logged yet), every top-level key starting with ``best_`` or named ``metric`` /
    ``mode`` also as tag ``plora.<key>``, top-level numbers as metrics ``summary/<key>``, and the
    whole dict as artifact ``sweep_summary.json``.
    """
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    run = client.get_run(parent_run_id)
    _log_params_once(client, run, {"summary": dict(summary)})
    tags, metrics = [], []
    timestamp = _now_ms()
    for key, value in summary.items():
        if str(key).startswith("best_") or key in ("metric", "mode"):
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            tags.append(RunTag(sanitize_key(f"plora.{key}"),
                               _truncate(text, MAX_TAG_VALUE_LENGTH)))
        number = None if isinstance(value, bool) else (
            _to_float(value) if isinstance(value, (int, float)) else None)
        if number is not None:
            metrics.append(Metric(sanitize_key(f"summary/{key}"), number, timestamp, 0))
    for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        _retry(client.log_batch, parent_run_id, tags=tags[start:start + MAX_PARAMS_TAGS_PER_BATCH])
    if metrics:
        _retry(client.log_batch, parent_run_id, metrics=metrics[:MAX_METRICS_PER_BATCH])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep_summary.json"
        path.write_text(json.dumps(dict(summary), indent=2, default=str, allow_nan=True))
        _retry(client.log_artifact, parent_run_id, str(path))
    _retry(client.set_terminated, parent_run_id, status=status)


def sweep_trials(tracking_uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The trial runs under a sweep run, oldest first: dicts with ``run_id``, ``trial_id``,
    ``trial_name``, ``status`` (plora.status), ``mlflow_status``, ``params``, ``metrics``
    (latest value of each)."""
    client = _client(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = _search_all(client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return [{
        "run_id": r.info.run_id,
        "trial_id": r.data.tags.get(TAG_TRIAL_ID),
        "trial_name": r.data.tags.get(TAG_TRIAL_NAME, r.info.run_name),
        "status": r.data.tags.get(TAG_STATUS),
        "mlflow_status": r.info.status,
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
    } for r in runs]


def mlflow_ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The command line that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {shlex.quote(str(tracking_uri))} --port {int(port)}"


def compare_runs_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's compare view for ``run_ids`` (MLflow 3 hash-router URL)."""
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")), safe="")
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


__all__ = [
    "DEFAULT_DB", "TRIAL_STATUSES", "RunLogger", "compare_runs_url", "default_tracking_uri",
    "ensure_experiment", "finish_sweep", "flatten_params", "git_commit", "mlflow_ui_command",
    "package_versions", "sanitize_key", "set_trial_status", "start_sweep_run", "sweep_trials",
    "trial_run",
]
