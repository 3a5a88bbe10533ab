"""Ray Train: a run as N data-parallel workers (torch DDP or DeepSpeed ZeRO 0-3).

    python -m plora_ray.train RUN.yaml --workers 2 --engine deepspeed --zero 3

Every worker builds the same model and plan (``loop.setup``), trains its share of every
global step, unloads at the same step (the clock counts samples summed over workers; the
re-initialised A is seeded by (seed, stage, layer), so identical on every rank) and, every
``checkpoint_every_steps`` and at the end, saves a checkpoint collectively and calls
``ray.train.report`` (rank 0 passes the checkpoint). A worker that dies, or a node that is
lost, restarts the group from the last checkpoint on the nodes left (Train's
``FailureConfig(max_failures=distributed.max_failures)``); the checkpoint holds the PLoRA
stage, clock and ledger, so the run goes on in the same stage.

Per-worker resources are Ray resources: ``cpus_per_worker`` CPUs and, with ``use_gpu``,
``gpus_per_worker`` GPUs (a fraction shares a GPU), placed by ``placement_strategy``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from plora_ray.config.schema import RunConfig
from plora_ray.run.loop import fit, setup
from plora_ray.run.replicas import replicas_identical
from plora_ray.tracking.lifecycle import TrialTracker, add_trial_node
from plora_ray.run.rundir import CHECKPOINT, load_run_checkpoint, restore_run, save_run_checkpoint, write_run_dir
from plora_ray.ray.trainer import extensions_dir, trainer_for, worker_env, worker_resources  # noqa: F401 (re-exported)


class DistributedError(Exception):
    """A Ray run that failed (a worker group error, no cluster); one line for the user."""


# "module:function": called as on_step(rec, rank) after every step in every worker whose
# environment sets it (the node's, when `ray start` got it): fault injection on one node only
STEP_HOOK_ENV = "PLORA_RAY_STEP_HOOK"


def _env_step_hook():
    spec = os.environ.get(STEP_HOOK_ENV)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def report_metrics(run, final: bool) -> dict:
    last = run.history[-1]
    m = {"step": last["step"], "samples": last["samples"], "train/loss": last["loss"],
         "train/lr": last["lr"], "plora/stage": run.unloader.stage if run.unloader else 0,
         "plora/unloads": len(run.unloads), "final": final}
    if run.unloads:
        m["plora/accumulated_rank"] = run.unloads[-1].mean_rank
    return m


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the loop of ``loop.fit`` with Ray's checkpoints and reports.

    ``config["on_step"]``, if given, is called as ``on_step(rec, rank)`` after every step
    (an injection point: tests use it to kill a worker).
    """
    import ray.train
    from ray.train import Checkpoint

    started = time.time()
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.distributed.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    run = setup(cfg, rank, world, device)
    if "submitted" in config:  # the worker group's start-up, from the trainer's creation
        run.timings["train_start"] = max(0.0, started - config["submitted"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_run_checkpoint(run, d)
    node_id = ray.get_runtime_context().get_node_id()
    tracker = TrialTracker(config.get("tracking"), rank)
    if tracker.logger:  # rank 0 of a trial: where it runs (a lost node moves it)
        add_trial_node(config["tracking"]["uri"], config["tracking"]["run_id"], node_id)
    tracker.trainable_params(sum(p.numel() for p in run.model.parameters() if p.requires_grad))
    hooks = [h for h in (config.get("on_step"), _env_step_hook()) if h]

    def on_step(rec):
        for hook in hooks:
            hook(rec, rank)
        tracker.step(rec)

    def report(run, metrics):
        with tempfile.TemporaryDirectory() as tmp:
            written = save_run_checkpoint(run, tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if written else None)

    def on_checkpoint(run, final):
        metrics = report_metrics(run, final)
        metrics["node_id"] = node_id
        scores = run.evals[-1] if run.evals and run.evals[-1]["step"] == run.clock.steps else {}
        scores = {k: v for k, v in scores.items() if k != "step"}
        metrics.update(scores)
        if run.items:
            tracker.items(run.clock.steps, run.clock.samples, run.items)
        tracker.metrics(scores, run.clock.steps)
        if final:
            metrics["replicas_identical"] = replicas_identical(run)
        # so far (evaluation included): a trial ASHA stops keeps its phases up to here
        tracker.phases(run.timings, run.clock.steps)
        report(run, metrics)

    try:
        fit(run, on_step=on_step, on_unload=tracker.unload, on_checkpoint=on_checkpoint, progress=rank == 0)
        tracker.phases(run.timings, run.clock.steps)
    except FloatingPointError as exc:  # every rank sees the same all-reduced loss
        tracker.flush()
        metrics = report_metrics(run, final=True) if run.history else {"step": 0, "final": True}
        metrics["node_id"] = node_id
        metrics.update({"diverged": True, "diverged_reason": str(exc)})
        report(run, metrics)
    finally:
        tracker.flush()


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set environment variables for the ``with`` block only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# the local cluster's processes (ensure_ray)
LOCAL_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``; without one, the
    cluster of the Ray Job this runs in, ``RAY_ADDRESS``), or start a local cluster (unless
    Ray is already initialised).

    Only a local cluster started here gets settings: token authentication off unless the
    user set ``RAY_AUTH_MODE`` (Ray would otherwise write ``~/.ray/auth_token``; its processes
    inherit the variable when they start, it is not left set in this process), and Ray
    Train's controller polling every 0.25 s instead of 2 s (each ``report`` waits one poll)
    and no preemption watcher (an actor process per trial that polls whether a node is being
    drained by an autoscaler: a cluster of this one machine has none), through this job's
    runtime environment. The dashboard stays on (loopback only): Ray Train's
    placement-group cleaner asks its state API whether a controller is still alive. An existing
    cluster keeps its own settings: its authentication is whatever its operator chose.
    """
    import ray

    from plora_ray.ray.cluster import cluster_address

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    auth = {} if "RAY_AUTH_MODE" in os.environ else {"RAY_AUTH_MODE": "disabled"}
    with _env(auth):
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=1 << 30, log_to_driver=True,
                 dashboard_host="127.0.0.1",  # the Jobs API runs code: loopback only
                 runtime_env={"env_vars": LOCAL_SETTINGS})


def run_distributed(cfg: RunConfig, out: Path, name: str, address: str | None = None, on_step=None) -> dict:
    """Run ``cfg`` on Ray and write the run directory ``out`` (as a one-process run does) from
    the final checkpoint. Returns the summary. Raises DistributedError, FloatingPointError."""
    import ray.exceptions
    import ray.train

    try:
        ensure_ray(address)
        storage = cfg.distributed.storage_path or str((out / "ray").resolve())
        result = trainer_for(cfg, storage, name, on_step=on_step).fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError, ConnectionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"distributed run failed ({first}); the worker logs above say why") from None
    if result.error:
        raise DistributedError(f"distributed run failed: {result.error}")
    final = out / CHECKPOINT
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(d, final)
    metrics = result.metrics or {}
    if metrics.get("diverged"):
        raise FloatingPointError(metrics.get("diverged_reason", "diverged"))
    return write_run_dir(restore_run(final), out, replicas_identical=metrics.get("replicas_identical"))
