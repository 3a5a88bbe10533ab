"""The driver's side of MLflow tracking: one parent run per sweep, one nested run per trial.

The layout written here is the contract of ``docs/tracking_layout.md``. MLflow does the
batching, asynchronous logging and the git tag (``mlflow.source.git.commit``); this module
keeps what MLflow does not do: one idempotent run per trial id (a restarted or resumed trial
continues its run), readable run names, only the active configuration's params.

Everything goes through ``mlflow.MlflowClient(tracking_uri=...)``: no global MLflow state, so
several stores can be used in one process, and a Ray worker needs only a :class:`TrialRecord`
(the URI and a run id). The driver calls ``ensure_experiment``, ``start_sweep_run``,
``trial_run``, ``set_trial_status``, ``end_running_trials``, ``finish_sweep``; rank 0 of a trial
logs through ``tracking.worker.TrialTracker``. Reading runs back is ``analysis.store``'s
(``search_all``, ``sweep_trials``, ``retry``).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.store import retry, search_all, sweep_trials
from plora_ray.tracking.naming import flatten_params, sanitize_key, text_value
from plora_ray.tracking.provenance import git_commit, package_versions

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"

TAG_RUN_TYPE = "plora.run_type"          # "sweep" | "trial"
TAG_SWEEP = "plora.sweep"
TAG_TRIAL_ID = "plora.trial_id"
TAG_STATUS = "plora.status"
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

MAX_PARAMS_TAGS_PER_BATCH = 100


@dataclass(frozen=True)
class TrialRecord:
    """Where a trial's metrics go: its MLflow store and run. Made by the driver
    (``plora_ray.sweep.tune``), carried to the workers in ``train_loop_config["tracking"]``."""

    uri: str
    run_id: str


def check_mlflow_environment() -> None:
    """MLflow's own settings in the environment (``MLFLOW_*``) that MLflow cannot read, refused
    before any run: MLflow parses some only inside its asynchronous logging thread (e.g.
    ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=0.5``, which must be an integer), where the failure
    kills the thread and every wait for a logged batch then hangs. ConfigError naming the variable."""
    import mlflow.environment_variables as variables

    from plora_ray.config.schema import ConfigError

    for var in vars(variables).values():
        if isinstance(var, variables._EnvironmentVariable) and var.get_raw() is not None:
            try:
                var.get()
            except ValueError:
                kind = "true, false, 1 or 0" if var.type is bool else getattr(var.type, "__name__", var.type)
                raise ConfigError(f"environment variable {var.name}={var.get_raw()!r}: MLflow reads it as "
                                  f"{kind}: give such a value, or unset it") from None


def mlflow_client(tracking_uri: str):
    """A client on ``tracking_uri`` (no global MLflow state; a new SQLite store is created)."""
    from mlflow import MlflowClient  # lazy: importing mlflow costs about 1 s

    return MlflowClient(tracking_uri=str(tracking_uri))


def default_tracking_uri(directory: str | Path) -> str:
    """``sqlite:////abs/<directory>/mlflow.db`` (four slashes: an absolute path)."""
    return "sqlite:///" + (Path(directory).expanduser().resolve() / DEFAULT_DB).as_posix()


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """The id of experiment ``name``, created if missing (from the driver: an experiment first
    created inside a Ray worker gets its artifacts in Ray's temporary session directory).

    For a SQLite store the artifact location defaults to ``<db dir>/mlartifacts``; a deleted
    experiment of that name is restored."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
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
        return retry(client.create_experiment, name, artifact_location=location)
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
    all_tags.update({sanitize_key(k): text_value(v, 8000) for k, v in (tags or {}).items()})
    client = mlflow_client(tracking_uri)
    run_id = retry(client.create_run, experiment_id, tags=all_tags, run_name=sweep_name).info.run_id
    if space_file is not None:
        retry(client.log_artifact, run_id, str(space_file), artifact_path="search_space")
    return run_id


def _find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = [r for r in search_all(client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
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

    client = mlflow_client(tracking_uri)
    trial_id = str(trial_id)
    run = _find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if run is None:
        parent = client.get_run(parent_run_id).data.tags
        all_tags = {TAG_PARENT: parent_run_id, TAG_RUN_TYPE: "trial", TAG_TRIAL_ID: trial_id,
                    TAG_STATUS: "running", **dict(tags or {})}
        all_tags.update({k: parent[k] for k in (TAG_SWEEP, TAG_GIT_COMMIT) if k in parent})
        run = retry(client.create_run, experiment_id, tags=all_tags, run_name=str(name))
    elif run.info.status != "RUNNING":
        retry(client.update_run, run.info.run_id, status="RUNNING")
        retry(client.set_tag, run.info.run_id, TAG_STATUS, "running")
    run_id = run.info.run_id
    fresh = [Param(k, v) for k, v in flatten_params(params or {}).items() if k not in run.data.params]
    for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
        retry(client.log_batch, run_id, params=fresh[start:start + MAX_PARAMS_TAGS_PER_BATCH])
    if run_config is not None:
        import yaml

        retry(client.log_text, run_id, yaml.safe_dump(dict(run_config), sort_keys=False), "config/run.yaml")
    return run_id


def add_trial_node(tracking_uri: str, run_id: str, node_id: str) -> None:
    """Append ``node_id`` to the run's ``plora.nodes`` tag (comma-separated, in order; a restart
    on the same node adds nothing): where a trial ran, and moved to after losing a node."""
    client = mlflow_client(tracking_uri)
    nodes = [n for n in client.get_run(run_id).data.tags.get(TAG_NODES, "").split(",") if n]
    if not nodes or nodes[-1] != node_id:
        retry(client.set_tag, run_id, TAG_NODES, ",".join([*nodes, node_id]))


def set_trial_status(tracking_uri: str, run_id: str, status: str) -> None:
    """Tag ``plora.status`` and end the run: finished → FINISHED, stopped_early → KILLED,
    diverged / failed → FAILED. ``running`` only sets the tag."""
    if status != "running" and status not in TRIAL_STATUSES:
        raise ValueError(f"unknown trial status {status!r}: expected one of "
                         f"{', '.join(['running', *TRIAL_STATUSES])}")
    client = mlflow_client(tracking_uri)
    retry(client.set_tag, run_id, TAG_STATUS, status)
    if status != "running":
        retry(client.set_terminated, run_id, status=TRIAL_STATUSES[status])


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
    client = mlflow_client(tracking_uri)
    for key, value in (tags or {}).items():
        retry(client.set_tag, parent_run_id, sanitize_key(key), text_value(value, 8000))
    retry(client.set_terminated, parent_run_id, status=status)


def mlflow_ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The command line that opens the MLflow UI on this store."""
    return f"mlflow ui --backend-store-uri {shlex.quote(str(tracking_uri))} --port {int(port)}"


__all__ = [
    "DEFAULT_DB", "TRIAL_STATUSES", "TrialRecord", "add_trial_node", "default_tracking_uri",
    "end_running_trials", "ensure_experiment", "finish_sweep", "mlflow_client", "mlflow_ui_command",
    "set_trial_status", "start_sweep_run", "trial_run",
]
