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
    return m


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the loop of ``loop.fit`` with Ray's checkpoints and reports.

    ``config``: ``run`` (the RunConfig as JSON, validated once here), ``tracking`` (the trial's
    :class:`~plora_ray.tracking.driver.TrialRecord`, or None) and ``submitted`` (when the
    trainer was made: the worker group's start-up is timed from it)."""
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
        tracker.metrics(scores, run.clock.steps)
        if final:
            metrics["replicas_identical"] = replicas_identical(run)
        # so far (evaluation included): a trial ASHA stops keeps its phases up to here
        tracker.phases(run.timings, run.clock.steps)
        report(run, metrics)

    try:
        fit(run, on_step=tracker.step, on_unload=tracker.unload, on_checkpoint=on_checkpoint, progress=rank == 0)
        tracker.phases(run.timings, run.clock.steps)
    except FloatingPointError as exc:  # every rank sees the same all-reduced loss
        tracker.flush()
        metrics = report_metrics(run, final=True) if run.history else {"step": 0, "final": True}
        metrics["node_id"] = node_id
        metrics.update({"diverged": True, "diverged_reason": str(exc)})
        report(run, metrics)
    finally:
        tracker.flush()
