"""Cluster batch runs: many sweeps queued on a Ray cluster as Ray Jobs.

    python -m plora_ray.batch submit search_spaces/batches/paper.yaml [--address http://HEAD:8265]
    python -m plora_ray.batch status search_spaces/batches/paper.yaml
    python -m plora_ray.batch logs   search_spaces/batches/paper.yaml unload [--follow]
    python -m plora_ray.batch stop   search_spaces/batches/paper.yaml [unload | JOB_ID ...]

A batch file lists sweeps, each a search-space file with overrides (``--set`` of the sweep CLI),
and what they share: the cluster's job address, the working directory uploaded with every job,
``storage`` and ``tracking_uri`` (see ``search_spaces/batches/example.yaml``). ``submit``
validates every sweep (the checks of ``python -m plora_ray.tune --dry-run``) before the first
job is submitted, then submits each as ``python -m plora_ray.tune SPACE --storage ...`` through
``ray.job_submission.JobSubmissionClient`` (the command line: :mod:`plora_ray.cli.batch`). The
job ids are recorded under the batch's name (``<state-dir>/<batch>.json``) and in each job's metadata (``plora.batch``, ``plora.sweep``), so
``status``, ``logs`` and ``stop`` find them later, from any machine that reaches the cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from plora_ray.assets.dialogues import DataError
from plora_ray.config.io import flow, format_validation_error, read_yaml
from plora_ray.config.schema import ConfigError
from plora_ray.config.strict import Strict

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_EXCLUDES = [".git", ".venv", "runs", "outputs", "mlruns", "mlartifacts", "*.db", "__pycache__",
                    ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
META_BATCH, META_SWEEP = "plora.batch", "plora.sweep"
WAIT_POLL_S = 5


class BatchSweep(Strict):
    space: str = Field(description="search-space file, relative to the batch file")
    name: str | None = Field(None, description="the sweep's name in the batch; default the file's stem")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, as --set key=value")

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in " /\\")):
            raise ValueError("must be a non-empty name without spaces or slashes")
        return value


class BatchSpec(Strict):
    name: str | None = Field(None, description="batch name; default the file's stem")
    address: str | None = Field(None, description="Ray Jobs address (the dashboard, http://HEAD:8265); "
                                "default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else " + DEFAULT_ADDRESS)
    working_dir: str = Field(".", description="uploaded with every job and its working directory; "
                             "relative to the directory the command runs in")
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES),
                                description="paths of working_dir not uploaded (gitignore syntax)")
    storage: str = Field(description="--storage of every sweep: an absolute path every node mounts, "
                         "s3://... or gs://...")
    tracking_uri: str | None = Field(None, description="--tracking-uri of every sweep (an MLflow server "
                                     "on a multi-node cluster)")
    report: bool = Field(True, description="false: --no-report")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables of the jobs")
    sweeps: list[BatchSweep] = Field(min_length=1)


class Batch:
    """A validated batch file: its sweeps resolved to files and job entrypoints."""

    def __init__(self, path: Path, spec: BatchSpec):
        self.path, self.spec = path, spec
        self.name = spec.name or path.stem
        self.working_dir = Path(spec.working_dir).expanduser().resolve()
        self.sweeps: list[tuple[str, Path, BatchSweep]] = []

    def entrypoint(self, space: Path, sweep: BatchSweep) -> str:
        rel = space.relative_to(self.working_dir).as_posix()
        cmd = ["python", "-m", "plora_ray.tune", rel, "--storage", self.spec.storage]
        if self.spec.tracking_uri:
            cmd += ["--tracking-uri", self.spec.tracking_uri]
        if not self.spec.report:
            cmd.append("--no-report")
        for key, value in sweep.set.items():
            cmd += ["--set", f"{key}={flow(value)}"]
        return shlex.join(cmd)

    def runtime_env(self) -> dict:
        env = {"working_dir": str(self.working_dir), "excludes": list(self.spec.excludes)}
        if self.spec.env:
            env["env_vars"] = dict(self.spec.env)
        return env


def load_batch(path: str | os.PathLike, check_paths: bool = True, storage: str | None = None,
               tracking_uri: str | None = None) -> Batch:
    """Read and validate a batch file and every sweep in it (as ``tune --dry-run`` would), before
    anything is submitted; raises ConfigError / DataError with one line. ``storage`` and
    ``tracking_uri`` replace the file's."""
    from plora_ray.ray.cluster import is_uri
    from plora_ray.sweep.preflight import check_sweep
    from plora_ray.config.sweep import load_sweep

    path = Path(path)
    data = read_yaml(path)
    data.update({k: v for k, v in (("storage", storage), ("tracking_uri", tracking_uri)) if v})
    try:
        spec = BatchSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, BatchSpec)}") from None
    batch = Batch(path, spec)
    if not batch.working_dir.is_dir():
        raise ConfigError(f"{path}: field 'working_dir': '{batch.working_dir}' is not a directory: give the "
                          "directory uploaded with every job (the repository root)")
    if not is_uri(spec.storage) and not Path(spec.storage).is_absolute():
        raise ConfigError(f"{path}: field 'storage': '{spec.storage}' is relative, and a job runs in a copy of "
                          "working_dir: give an absolute path every node mounts, s3://... or gs://...")
    seen: set[str] = set()
    for i, sweep in enumerate(spec.sweeps):
        where = f"{path}: sweeps[{i}]"
        space = (path.parent / sweep.space).resolve()
        name = sweep.name or space.stem
        if name in seen:
            raise ConfigError(f"{where}: the name '{name}' is used twice in the batch: give one 'name:' per sweep")
        seen.add(name)
        if not space.is_file():
            raise ConfigError(f"{where}: field 'space': '{space}' not found: give a path relative to {path.parent}")
        try:
            space.relative_to(batch.working_dir)
        except ValueError:
            raise ConfigError(f"{where}: field 'space': '{space}' is outside working_dir '{batch.working_dir}', "
                              "so the job would not have it: move it under working_dir or change "
                              "working_dir") from None
        overrides = [f"{k}={flow(v)}" for k, v in sweep.set.items()]
        try:
            sweep_spec = load_sweep(space, overrides, check_paths=check_paths)
            if check_paths:
                check_sweep(sweep_spec, spec.storage, False, spec.tracking_uri)
        except (ConfigError, DataError) as exc:
            raise type(exc)(f"{where} ({name}): {exc}") from None
        batch.sweeps.append((name, space, sweep))
    return batch


# ---------------------------------------------------------------------------- jobs


def job_address(cli: str | None, batch: Batch) -> str:
    return (cli or batch.spec.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--address {address}: no Ray Jobs server there ({first}): give the cluster's "
                          "dashboard address, e.g. http://HEAD:8265") from None


def _state_file(state_dir: Path, batch: Batch) -> Path:
    return state_dir / f"{batch.name}.json"


def read_state(state_dir: Path, batch: Batch) -> dict[str, list[str]]:
    f = _state_file(state_dir, batch)
    return json.loads(f.read_text()) if f.is_file() else {}


def submit(batch: Batch, client, state_dir: Path) -> list[tuple[str, str]]:
    """Submit every sweep of ``batch`` as a Ray Job; record and return (sweep, job id)."""
    state = read_state(state_dir, batch)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submitted = []
    for name, space, sweep in batch.sweeps:
        job_id = client.submit_job(entrypoint=batch.entrypoint(space, sweep), runtime_env=batch.runtime_env(),
                                   submission_id=f"{batch.name}-{name}-{stamp}",
                                   metadata={META_BATCH: batch.name, META_SWEEP: name})
        state.setdefault(name, []).append(job_id)
        submitted.append((name, job_id))
        state_dir.mkdir(parents=True, exist_ok=True)  # after each: a failure halfway loses no id
        _state_file(state_dir, batch).write_text(json.dumps(state, indent=1))
    return submitted


def batch_jobs(batch: Batch, client, state_dir: Path) -> dict[str, list]:
    """{sweep: [JobDetails, oldest first]} of the batch: the recorded ids, plus any job of the
    cluster whose metadata names the batch (submitted from another machine)."""
    state = read_state(state_dir, batch)
    out: dict[str, list] = {name: [] for name, _, _ in batch.sweeps}
    known = {job_id for ids in state.values() for job_id in ids}
    for job in client.list_jobs():
        meta = job.metadata or {}
        if job.submission_id in known or meta.get(META_BATCH) == batch.name:
            out.setdefault(meta.get(META_SWEEP) or "?", []).append(job)
    for jobs in out.values():
        jobs.sort(key=lambda j: (j.start_time or 0, j.submission_id or ""))
    return out


def job_status(job) -> str:
    return str(getattr(job.status, "value", job.status))


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def status_table(jobs: dict[str, list]) -> str:
    rows = [("sweep", "job id", "status", "started", "ended", "message")]
    for name, history in jobs.items():
        if not history:
            rows.append((name, "-", "NOT SUBMITTED", "-", "-", ""))
        for job in history:
            message = " ".join((job.message or "").split())
            rows.append((name, job.submission_id or job.job_id or "-", job_status(job), _time(job.start_time),
                         _time(job.end_time),
                message[:60] + ("..." if len(message) > 60 else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def pick_jobs(batch: Batch, jobs: dict[str, list], targets: list[str]) -> list:
    """The jobs named by sweep name or job id (the latest job of a sweep); all latest if none."""
    latest = {name: history[-1] for name, history in jobs.items() if history}
    if not targets:
        return list(latest.values())
    by_id = {j.submission_id: j for history in jobs.values() for j in history}
    picked = []
    for t in targets:
        if t in latest:
            picked.append(latest[t])
        elif t in by_id:
            picked.append(by_id[t])
        else:
            names = ", ".join(latest) or "none submitted yet"
            raise ConfigError(f"{batch.path}: no sweep or job id '{t}' in batch {batch.name} (sweeps with jobs: "
                              f"{names}): give one of them")
    return picked


def follow_logs(client, job_id: str) -> None:
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
