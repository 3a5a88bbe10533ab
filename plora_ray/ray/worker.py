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

import tempfile
import time

import torch

from plora_ray.config.schema import RunConfig
from plora_ray.ray.progress import TrialProgress
from plora_ray.run.loop import fit, setup
from plora_ray.run.replicas import replicas_identical
from plora_ray.run.rundir import load_run_checkpoint, save_run_checkpoint
from plora_ray.tracking.driver import add_trial_node
from plora_ray.tracking.worker import TrialTracker


def report_metrics(run, final: bool) -> dict:
    last = run.history[-1]
    m = {"step": last["step"], "samples": last["samples"], "train/loss": last["loss"],
         "train/lr": last["lr"], "plora/stage": run.unloader.stage if run.unloader else 0,
         "plora/unloads": len(run.unloads), "final": final}
    if run.unloads:
        m["plora/accumulated_rank"] = run.unloads[-1].mean_rank
    m["total_steps"] = len(run.steps)  # the driver's estimate of the sweep's time left (ray/progress.py)
    return m


def quiet_train_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` at INFO (its metrics dict and checkpoint
    path) under a logger named by its module's *file* (``logging.getLogger(__file__)`` in
    ``ray/train/v2/_internal/execution/context.py``), which ``LoggingConfig(log_level=...)``
    (``ray/trainer.py``), made for ``ray.train.*`` loggers, does not reach: raised to WARNING
    here, in the worker, so the console keeps the progress lines (``ray/progress.py``)."""
    import logging
    import sys

    module = sys.modules.get("ray.train.v2._internal.execution.context")
    if module is not None and getattr(module, "__file__", None):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the loop of ``loop.fit`` with Ray's checkpoints and reports.

    ``config``: ``run`` (the RunConfig as JSON, validated once here), ``tracking`` (the trial's
    :class:`~plora_ray.tracking.driver.TrialRecord`, or None) and ``submitted`` (when the
    trainer was made: the worker group's start-up is timed from it)."""
    import ray.train
    from ray.train import Checkpoint

    started = time.time()
    quiet_train_reports()
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
        add_trial_node(config["tracking"].uri, config["tracking"].run_id, node_id)
    tracker.trainable_params(sum(p.numel() for p in run.model.parameters() if p.requires_grad))
    score = config.get("score")  # a sweep's trial: each checkpoint's score (ray/trainer.py)

    def report(run, metrics):
        if score:  # NaN where not measured (or diverged): never ranked the best
            value = metrics.get(score["metric"]) if not metrics.get("diverged") else None
            metrics[score["key"]] = float("nan") if value is None else float(value)
        with tempfile.TemporaryDirectory() as tmp:
            written = save_run_checkpoint(run, tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if written else None)

    def on_checkpoint(run, final, scores):
        metrics = report_metrics(run, final)
        metrics["node_id"] = node_id
        metrics.update(scores)
        if run.items:
            tracker.items(run.clock.steps, run.clock.samples, run.items)
        tracker.metrics(scores, run.clock.steps, run.clock.samples)
        if final:
            metrics["replicas_identical"] = replicas_identical(run)
        report(run, metrics)

    e = cfg.eval  # benchmarks scored only at the end follow the last step
    final_evaluation = bool(e.final_only_tasks) or bool(e.harness.tasks and e.harness.at != "every")
    trial_progress = TrialProgress(cfg.name, len(run.steps), run.start_step, final_evaluation)

    def on_step(rec):
        tracker.step(rec)
        if rank == 0:  # the console: step k of the total, time left (the driver shows it)
            trial_progress.step(rec["step"])

    try:
        fit(run, on_step=on_step, on_unload=tracker.unload, on_checkpoint=on_checkpoint, progress=rank == 0)
        tracker.phases(run.timings, run.clock.steps)
    except FloatingPointError as exc:  # every rank sees the same all-reduced loss
        tracker.phases(run.timings, run.clock.steps)
        tracker.flush()
        metrics = report_metrics(run, final=True) if run.history else {"step": 0, "final": True}
        metrics["node_id"] = node_id
        metrics.update({"diverged": True, "diverged_reason": str(exc)})
        report(run, metrics)
    finally:
        tracker.flush()
