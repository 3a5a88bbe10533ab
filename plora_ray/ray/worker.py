"""A run's loop on Ray: N data-parallel Ray Train workers (torch DDP or DeepSpeed ZeRO 0-3),
or, a sweep's one-worker trial, its own Tune function (:func:`trial_loop`), both through
:func:`run_loop`.

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

import ray
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
    """One Ray Train worker: :func:`run_loop` with Train's rank, checkpoint and reports.

    ``config``: ``run`` (the RunConfig as JSON, validated once here), ``tracking`` (the trial's
    :class:`~plora_ray.tracking.driver.TrialRecord`, or None), ``submitted`` (when the trainer
    was made: the worker group's start-up is timed from it) and, in a sweep, ``score``."""
    import ray.train
    from ray.train import Checkpoint

    started = time.time()
    quiet_train_reports()
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    if cfg.distributed.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")

    def report(metrics, directory):
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if directory else None)

    submitted = config.get("submitted")
    run_loop(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, ray.train.get_checkpoint(), report,
             ray.get_runtime_context().get_node_id(), config.get("tracking"), config.get("score"),
             None if submitted is None else started - submitted)


def trial_loop(cfg: RunConfig, tracking, score: dict, extra, started: float | None = None) -> bool:
    """A one-worker trial in its own Tune function (no worker group: ``sweep/tune.py``):
    :func:`run_loop` with Tune's checkpoint and reports, each report's metrics completed by
    ``extra(metrics)``; True if the run diverged. ``started``: when the trial's function began
    (its start-up, ``phase/train_start_s``, counts from it)."""
    import logging

    from ray import tune

    # Tune's INFO line for every checkpoint it stores stays off the console, as Train's do
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def report(metrics, directory):
        extra(metrics)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    device = torch.device("cuda" if cfg.distributed.use_gpu else "cpu")  # Ray set the trial's GPU
    return run_loop(cfg, 0, 1, device, tune.get_checkpoint(), report, ray.get_runtime_context().get_node_id(),
                    tracking, score, None if started is None else time.time() - started)


def run_loop(cfg: RunConfig, rank: int, world: int, device: torch.device, checkpoint, report, node_id: str,
             tracking=None, score: dict | None = None, start_up: float | None = None) -> bool:
    """The loop of ``loop.fit`` with checkpoints and reports, in a Ray Train worker or (a
    one-worker trial) in its Tune function (:func:`trial_loop`); True if the run diverged.

    ``checkpoint``: Ray's checkpoint to resume from, or None; ``report(metrics, directory)``
    hands a checkpoint's metrics and its directory (None: nothing written) to Ray; ``node_id``:
    Ray's node, in every report and (rank 0) in the trial's MLflow run; ``score``
    (a sweep's trial): each report carries the sweep's metric under ``score["key"]``, NaN
    where not measured (ray/trainer.py); ``start_up``: seconds from the trainer's creation (or
    the trial function's start) to this call, ``phase/train_start_s``."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    run = setup(cfg, rank, world, device)
    if start_up is not None:  # the worker group's (or trial function's) start-up
        run.timings["train_start"] = max(0.0, start_up)
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_run_checkpoint(run, d)
    tracker = TrialTracker(tracking, rank)
    if tracker.logger:  # rank 0 of a trial: where it runs (a lost node moves it)
        add_trial_node(tracking.uri, tracking.run_id, node_id)
    tracker.trainable_params(sum(p.numel() for p in run.model.parameters() if p.requires_grad))

    def save(run, metrics, directory):  # the checkpoint's directory, None if nothing was written
        if score:  # NaN where not measured (or diverged): never ranked the best
            value = metrics.get(score["metric"]) if not metrics.get("diverged") else None
            metrics[score["key"]] = float("nan") if value is None else float(value)
        return directory if save_run_checkpoint(run, directory) else None

    last = []  # the final checkpoint's report: made once the trial's phases are logged, since a
    # scheduler may stop a trial at its last report (ASHA's max_t) before its function goes on

    def on_checkpoint(run, final, scores):
        metrics = report_metrics(run, final)
        metrics["node_id"] = node_id
        metrics.update(scores)
        if run.items:
            tracker.items(run.clock.steps, run.clock.samples, run.items)
        tracker.metrics(scores, run.clock.steps, run.clock.samples)
        if final:
            metrics["replicas_identical"] = replicas_identical(run)
            last.append((metrics, save(run, metrics, final_dir)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            report(metrics, save(run, metrics, tmp))

    e = cfg.eval  # benchmarks scored only at the end follow the last step
    final_evaluation = bool(e.final_only_tasks) or bool(e.harness.tasks and e.harness.at != "every")
    trial_progress = TrialProgress(cfg.name, len(run.steps), run.start_step, final_evaluation)

    def on_step(rec):
        tracker.step(rec)
        if rank == 0:  # the console: step k of the total, time left (the driver shows it)
            trial_progress.step(rec["step"])

    def final_metrics(extra: dict) -> dict:  # a final report fit itself did not make
        metrics = report_metrics(run, final=True) if run.history else {"step": 0, "final": True}
        return {**metrics, "node_id": node_id, **extra}

    diverged = False
    with tempfile.TemporaryDirectory() as final_dir:
        try:
            fit(run, on_step=on_step, on_unload=tracker.unload, on_checkpoint=on_checkpoint, progress=rank == 0)
        except FloatingPointError as exc:  # every rank sees the same all-reduced loss
            diverged = True
            metrics = final_metrics({"diverged": True, "diverged_reason": str(exc)})
            last[:] = [(metrics, save(run, metrics, final_dir))]
        finally:
            tracker.flush()
        if not last:  # resumed from the final checkpoint (the run had ended, unrecorded): its result again
            last.append((final_metrics({k: v for k, v in (run.evals[-1] if run.evals else {}).items()
                                        if k != "step"}), None))
        tracker.phases(run.timings, run.clock.steps)
        report(*last[0])
    return diverged
