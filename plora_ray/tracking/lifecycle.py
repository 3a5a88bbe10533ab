"""MLflow tracking for sweeps: one parent run per sweep, one nested run per trial.

The layout written here is the contract of ``docs/tracking_layout.md``. MLflow does the
batching (``log_batch``), asynchronous logging (``synchronous=False`` + waiting on the returned
operations) and the git tag (``mlflow.source.git.commit``); this module keeps what MLflow does
not do: one idempotent run per trial id (a restarted or resumed trial continues its run), no
duplicate steps after a restart, readable run names, only the active configuration's params.

Everything goes through ``mlflow.MlflowClient(tracking_uri=...)``: no global MLflow state, so
several stores can be used in one process and a Ray worker needs only the URI and a run id.
Who writes what: the driver (``ensure_experiment``, ``start_sweep_run``, ``trial_run``,
``set_trial_status``, ``end_running_trials``, ``finish_sweep``); rank 0 of a trial logs its
curves and artifacts through a ``TrialTracker``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

TAG_RUN_TYPE = "plora.run_type"          # "sweep" | "trial"
TAG_SWEEP = "plora.sweep"
TAG_TRIAL_ID = "plora.trial_id"
TAG_STATUS = "plora.status"
TAG_CONFIG_ID = "plora.config_id"        # hash of the searched values without the seed
TAG_SEED = "plora.seed"
TAG_NODES = "plora.nodes"                # Ray node ids rank 0 of a trial ran on, in order
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"        # MLflow's own nesting tag (the UI groups by it)

# plora.status -> MLflow run status
TRIAL_STATUSES = {
    "finished": "FINISHED",
    "stopped_early": "KILLED",   # stopped by the scheduler (ASHA): a normal, incomplete end
    "diverged": "FAILED",        # non-finite or exploding loss
    "failed": "FAILED",          # an exception, exhausted restarts, or never heard of again
}

MAX_KEY_LENGTH = 250             # MLflow 3.17 (mlflow.utils.validation)
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_TAGS_PER_BATCH = 100
VERSIONED_PACKAGES = ("ray", "peft", "torch", "transformers", "deepspeed", "mlflow", "plora-ray")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")

# short names of searched paths in run names (``u16 m0.1 r1 s0``); others use their initials
ABBREVIATIONS = {"plora.unload_every_samples": "u", "plora.unload_every_steps": "us",
                 "plora.momentum": "m", "plora.momentum_rule": "", "plora.optimizer_on_unload": "",
                 "plora.rewarmup_steps": "rw", "lora.rank": "r", "lora.alpha": "a", "optim.lr": "lr",
                 "method": "", "seed": "s", "data.micro_batch_size": "mb"}
RUN_NAME_CHARS = 15  # what the MLflow UI's run list shows before it cuts a name with "..."


# ----------------------------------------------------------------------------- helpers


def _client(tracking_uri: str):
    from mlflow import MlflowClient  # lazy: importing mlflow costs about 1 s

    return MlflowClient(tracking_uri=str(tracking_uri))


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


def sanitize_key(name: str) -> str:
    """A metric/param key MLflow accepts: alphanumerics and ``_ - . / space :``, no empty or
    ``.``/``..`` path segments, at most 250 characters (longer keys end in a short hash)."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    parts = [p.replace(".", "_") if p in (".", "..") else p for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = key[: MAX_KEY_LENGTH - 9].rstrip("/") + "~" + digest
    return key


def _text(value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str:
    if isinstance(value, (list, tuple, set)):
        value = json.dumps(list(value), default=str)
    text = str(value)
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys (``{"lora": {"rank": 8}}`` -> ``{"lora.rank": "8"}``);
    lists as JSON, values cut to MLflow's 6000 characters, an empty dict kept as ``"{}"``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):  # pydantic models
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, full))
        else:
            out[sanitize_key(full)] = "{}" if isinstance(value, Mapping) else _text(value)
    return out


def active_params(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config without what does not shape this run: the output directory and name
    (the same for every trial), the tiny model's shape unless the model is ``tiny``, PLoRA's
    section unless the method is plora, LoRA's for full fine-tuning, DeepSpeed's knobs under
    DDP, the evaluation settings when nothing is evaluated."""
    cfg = json.loads(json.dumps(run_config, default=str))  # a deep copy of plain values
    for key in ("output_dir", "name"):
        cfg.pop(key, None)
    method = cfg.get("method")
    if cfg.get("model", {}).get("name_or_path") != "tiny":
        cfg.get("model", {}).pop("tiny", None)
    if method != "plora":
        cfg.pop("plora", None)
    elif cfg["plora"].get("optimizer_on_unload") != "prune":
        cfg["plora"].pop("prune_ratio", None)
    if method == "full":
        cfg.pop("lora", None)
    dist = cfg.get("distributed", {})
    dist.pop("storage_path", None)
    if not dist.get("use_gpu"):
        dist.pop("gpus_per_worker", None)
    if dist.get("engine") != "deepspeed":
        dist.pop("zero_stage", None)
        dist.pop("offload_optimizer", None)
    if not cfg.get("eval", {}).get("tasks"):
        cfg.pop("eval", None)
    return cfg


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def config_label(values: Mapping[str, Any]) -> str:
    """The searched values, short: ``u16 m0.1 r1`` (None values left out)."""
    parts = []
    for path, value in values.items():
        if value is not None:
            last = path.rsplit(".", 1)[-1]
            abbr = ABBREVIATIONS.get(path, "".join(w[:1] for w in last.split("_")))
            parts.append(f"{abbr}{_format_value(value)}")
    return " ".join(parts)


def run_name(values: Mapping[str, Any], seed: int, trial_id: str | None = None) -> str:
    """A short name from the searched values and the seed: ``u16 m0.1 r1 s0``.

    The MLflow UI shows about 15 characters; a longer name gets the trial's number in front
    so that names stay distinct where they are cut."""
    name = " ".join(filter(None, [config_label(values), f"s{seed}"]))
    number = str(trial_id or "").rsplit("_", 1)[-1]
    if len(name) > RUN_NAME_CHARS and number.isdigit():
        name = f"#{int(number)} {name}"
    return name


def config_id(values: Mapping[str, Any]) -> str:
    """A short hash of the searched values (no seed): the repeats of a configuration share it."""
    text = json.dumps({k: values[k] for k in sorted(values)}, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def trial_tags(values: Mapping[str, Any], seed: int) -> dict[str, str]:
    """``plora.config_id``, ``plora.seed`` and one ``space.<path>`` tag per searched value."""
    tags = {TAG_CONFIG_ID: config_id(values), TAG_SEED: str(seed)}
    tags.update({sanitize_key(f"space.{k}"): _text(v, 5000) for k, v in values.items()})
    return tags


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def git_commit(path: str | Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding ``path`` (default: this package's source,
    then the working directory); ``("unknown", None)`` outside a git repository."""
    for where in ([Path(path)] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]):
        where = where if where.is_dir() else where.parent
        git = ["git", "-C", str(where)]
        try:
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", None


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (from package metadata: nothing is imported)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------------------- driver side


def default_tracking_uri(directory: str | Path) -> str:
    """``sqlite:////abs/<directory>/mlflow.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + (Path(directory).expanduser().resolve() / DEFAULT_DB).as_posix()


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """The id of experiment ``name``, created if missing (from the driver: an experiment first
    created inside a Ray worker gets its artifacts in Ray's temporary session directory).

    For a SQLite store the artifact location defaults to ``<db dir>/mlartifacts``; a deleted
    experiment of that name is restored."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    uri = str(tracking_uri)
    if artifact_root is None and uri.startswith("sqlite:///") and ":memory:" not in uri:
        artifact_root = Path(uri[len("sqlite:///"):].split("?", 1)[0]).resolve().parent / DEFAULT_ARTIFACT_DIR
    location = None
    if artifact_root is not None:
        location = str(artifact_root)
        if "://" not in location:
            root = Path(location).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_posix()
    try:
        return _retry(client.create_experiment, name, artifact_location=location)
    except MlflowException as exc:  # created concurrently by another process
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def start_sweep_run(tracking_uri: str, experiment_id: str, sweep_name: str,
                    space_file: str | Path | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """Create the sweep's parent run; returns its id. Tags ``plora.run_type=sweep``,
    ``plora.sweep``, ``mlflow.source.git.commit``, ``plora.git_dirty``, ``plora.version.<pkg>``
    and ``tags`` (e.g. ``plora.metric``, ``plora.mode``); artifact ``search_space/<file>``."""
    commit, dirty = git_commit()
    all_tags = {TAG_RUN_TYPE: "sweep", TAG_SWEEP: sweep_name, TAG_GIT_COMMIT: commit}
    if dirty is not None:
        all_tags["plora.git_dirty"] = str(dirty).lower()
    all_tags.update({f"plora.version.{p}": v for p, v in package_versions().items()})
    all_tags.update({sanitize_key(k): _text(v, 8000) for k, v in (tags or {}).items()})
    client = _client(tracking_uri)
    run_id = _retry(client.create_run, experiment_id, tags=all_tags, run_name=sweep_name).info.run_id
    if space_file is not None:
        _retry(client.log_artifact, run_id, str(space_file), artifact_path="search_space")
    return run_id


def _find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = [r for r in _search_all(client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
            if r.data.tags.get(TAG_TRIAL_ID) == trial_id]
    return min(runs, key=lambda r: r.info.start_time or 0) if runs else None


def trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
              name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
              run_config: Mapping[str, Any] | None = None) -> str:
    """The run of trial ``trial_id`` under sweep run ``parent_run_id``, created on first call.

    Idempotent: a later call with the same (parent, trial id), a restarted or resumed trial,
    returns the same run, sets it back to RUNNING if it had ended and logs only the params it
    does not have yet (a key logged before keeps its first value). ``run_config`` is stored as
    artifact ``config/run.yaml``."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    trial_id = str(trial_id)
    run = _find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if run is None:
        parent = client.get_run(parent_run_id).data.tags
        all_tags = {TAG_PARENT: parent_run_id, TAG_RUN_TYPE: "trial", TAG_TRIAL_ID: trial_id,
                    TAG_STATUS: "running", **dict(tags or {})}
        all_tags.update({k: parent[k] for k in (TAG_SWEEP, TAG_GIT_COMMIT) if k in parent})
        run = _retry(client.create_run, experiment_id, tags=all_tags, run_name=str(name))
    elif run.info.status != "RUNNING":
        _retry(client.update_run, run.info.run_id, status="RUNNING")
        _retry(client.set_tag, run.info.run_id, TAG_STATUS, "running")
    run_id = run.info.run_id
    fresh = [Param(k, v) for k, v in flatten_params(params or {}).items() if k not in run.data.params]
    for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
        _retry(client.log_batch, run_id, params=fresh[start:start + MAX_PARAMS_TAGS_PER_BATCH])
    if run_config is not None:
        import yaml

        _retry(client.log_text, run_id, yaml.safe_dump(dict(run_config), sort_keys=False), "config/run.yaml")
    return run_id


def add_trial_node(tracking_uri: str, run_id: str, node_id: str) -> None:
    """Append ``node_id`` to the run's ``plora.nodes`` tag (comma-separated, in order; a restart
    on the same node adds nothing): where a trial ran, and moved to after losing a node."""
    client = _client(tracking_uri)
    nodes = [n for n in client.get_run(run_id).data.tags.get(TAG_NODES, "").split(",") if n]
    if not nodes or nodes[-1] != node_id:
        _retry(client.set_tag, run_id, TAG_NODES, ",".join([*nodes, node_id]))


def set_trial_status(tracking_uri: str, run_id: str, status: str) -> None:
    """Tag ``plora.status`` and end the run: finished → FINISHED, stopped_early → KILLED,
    diverged / failed → FAILED. ``running`` only sets the tag."""
    if status != "running" and status not in TRIAL_STATUSES:
        raise ValueError(f"unknown trial status {status!r}: expected one of "
                         f"{', '.join(['running', *TRIAL_STATUSES])}")
    client = _client(tracking_uri)
    _retry(client.set_tag, run_id, TAG_STATUS, status)
    if status != "running":
        _retry(client.set_terminated, run_id, status=TRIAL_STATUSES[status])


def end_running_trials(tracking_uri: str, parent_run_id: str, outcome: Mapping[str, str] | None = None,
                       default: str = "failed") -> dict[str, str]:
    """Give every trial of the sweep still RUNNING its end: ``outcome[trial_id]`` if known,
    else ``default`` (a trial the driver never heard from again has failed). Returns
    ``{trial_id: status}`` of the runs it ended."""
    ended = {}
    for trial in sweep_trials(tracking_uri, parent_run_id):
        if trial["mlflow_status"] == "RUNNING" or trial["status"] == "running":
            status = (outcome or {}).get(trial["trial_id"], default)
            set_trial_status(tracking_uri, trial["run_id"], status)
            ended[trial["trial_id"]] = status
    return ended


def finish_sweep(tracking_uri: str, parent_run_id: str, tags: Mapping[str, Any] | None = None,
                 status: str = "FINISHED") -> None:
    """End the sweep's parent run, with ``tags`` (plain strings, e.g. ``plora.best_config_id``)."""
    client = _client(tracking_uri)
    for key, value in (tags or {}).items():
        _retry(client.set_tag, parent_run_id, sanitize_key(key), _text(value, 8000))
    _retry(client.set_terminated, parent_run_id, status=status)


def sweep_trials(tracking_uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The trial runs under a sweep run, oldest first: dicts with ``run_id``, ``trial_id``,
    ``name``, ``status`` (plora.status), ``mlflow_status``, ``config_id``, ``seed``, ``space``
    (the searched values as tagged), ``tags``, ``params``, ``metrics`` (latest values)."""
    client = _client(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = _search_all(client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TAG_TRIAL_ID), "name": r.info.run_name,
             "status": r.data.tags.get(TAG_STATUS), "mlflow_status": r.info.status,
             "config_id": r.data.tags.get(TAG_CONFIG_ID), "seed": r.data.tags.get(TAG_SEED),
             "space": {k[len("space."):]: v for k, v in r.data.tags.items() if k.startswith("space.")},
             "tags": dict(r.data.tags), "params": dict(r.data.params), "metrics": dict(r.data.metrics)}
            for r in runs]


def mlflow_ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The command line that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {shlex.quote(str(tracking_uri))} --port {int(port)}"


def compare_runs_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's compare view for ``run_ids`` (MLflow 3 hash-router URL)."""
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")), safe="")
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


# ----------------------------------------------------------------------------- worker side


class RunLogger:
    """Metrics and artifacts into one run, metrics through MLflow's asynchronous ``log_batch``.

    A resumed trial re-runs the steps between its last checkpoint and the failure: with
    ``skip_logged_steps`` (default) a metric is not logged at a step at or below the last step
    the run already had for that key when this logger was created, so curves keep one point per
    step. ``flush()`` waits until everything logged is stored (call it in a ``finally``).
    """

    def __init__(self, tracking_uri: str, run_id: str, skip_logged_steps: bool = True):
        self.run_id = run_id
        self._client = _client(tracking_uri)
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
        _retry(self._client.log_dict, self.run_id, dict(data), artifact_file)

    def flush(self) -> None:
        """Wait for every queued batch; one that failed (a busy SQLite file) is written again."""
        pending, self._pending = self._pending, []
        for batch, operation in pending:
            try:
                operation.wait()
            except Exception as exc:
                log.warning("asynchronous MLflow logging failed (%s); logging again", exc)
                _retry(self._client.log_batch, self.run_id, metrics=batch, synchronous=True)

    close = flush

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


class TrialTracker:
    """Rank 0's MLflow logging for a trial (``config["tracking"] = {uri, run_id}``); a no-op on
    other ranks and without tracking. A restarted worker group re-runs the steps after its last
    checkpoint: the logger skips steps the run already has, and ``time/elapsed_s`` continues
    from the last value logged."""

    def __init__(self, tracking: dict | None, rank: int):
        self.logger = RunLogger(tracking["uri"], tracking["run_id"]) if tracking and rank == 0 else None
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

    def metrics(self, metrics: dict, step: int) -> None:
        self._log_unloads(wait=True)
        if self.logger:
            self.logger.log_metrics(metrics, step)
            self.logger.flush()  # a checkpoint: the driver and the UI see it now

    def phases(self, timings: dict, step: int) -> None:
        """Wall seconds per phase of the trial (``phase/<name>_s``: train_start, model_load,
        tokenise, engine, steps, unload, evaluation, checkpoint), running totals: logged at
        every checkpoint and at the end."""
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


__all__ = [
    "DEFAULT_DB", "TRIAL_STATUSES", "RunLogger", "TrialTracker", "active_params", "add_trial_node",
    "compare_runs_url",
    "config_label",
    "config_id", "default_tracking_uri", "end_running_trials", "ensure_experiment", "finish_sweep",
    "flatten_params", "git_commit", "mlflow_ui_command", "package_versions", "run_name", "sanitize_key",
    "set_trial_status", "start_sweep_run", "sweep_trials", "trial_run", "trial_tags",
]
