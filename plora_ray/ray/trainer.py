"""The Ray Train ``TorchTrainer`` of a run, built without importing the training stack.

A Tune trial's actor and Train's controller only build and drive the trainer; importing
:mod:`plora_ray.ray.worker` (torch's training loop, transformers, peft: ~5 s of CPU a process)
there would be start-up paid twice per trial. The workers import it when they run
:func:`train_loop` (one way only: the worker never imports this module).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from plora_ray.config.names import direction
from plora_ray.config.paths import CACHE_ENV, extensions_dir
from plora_ray.config.schema import RunConfig

if TYPE_CHECKING:  # mlflow stays out of the trial actor and Train's controller
    from plora_ray.tracking.driver import TrialRecord


def worker_env(cfg: RunConfig) -> dict[str, str]:
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 re-routes a worker's print() through its logger
    # *and* prints it, so every line would show twice
    env = {"TORCH_EXTENSIONS_DIR": extensions_dir(), "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if CACHE_ENV in os.environ:
        env[CACHE_ENV] = os.environ[CACHE_ENV]
    return env


def train_loop(config: dict) -> None:
    """Each worker's entry point: :func:`plora_ray.ray.worker.train_loop_per_worker`, imported
    in the worker only."""
    from plora_ray.ray.worker import train_loop_per_worker

    train_loop_per_worker(config)


def worker_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of one worker: its CPUs and, with ``use_gpu``, its GPUs as given (0.5
    stays 0.5: two workers share a GPU; Ray's default for ``use_gpu`` would be 1)."""
    d = cfg.distributed
    res = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        res["GPU"] = d.gpus_per_worker if d.gpus_per_worker is not None else 1.0
    return res


# the key under which each checkpoint's report carries its score: the sweep's metric where that
# checkpoint measured it, else NaN (a diverged step, a task scored at the last checkpoint only).
# Not the metric's own key: Ray 2.60 scores a report that lacks the attribute as -inf times the
# order, i.e. as the *best* under "min" (ray/train/_internal/checkpoint_manager.py,
# _get_checkpoint_score), and a NaN under the metric's name would reach Tune's searcher; a NaN
# score ranks below every number, so such a checkpoint is dropped once it is not the latest
CHECKPOINT_SCORE = "checkpoint_score"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train V2's record of the checkpoints it keeps


def checkpoint_config(metric: str | None = None, mode: str | None = None, tune: bool = False):
    """Which checkpoints a run keeps (Train's; ``tune``: Tune's, for a trial that trains in its
    function). With a sweep's ``metric``: the best by it and the latest (for resume):
    ``num_to_keep=1`` ranks by :data:`CHECKPOINT_SCORE` in ``mode`` and neither deletes the
    latest checkpoint, whatever its score (``_save_state_and_delete_old_checkpoints`` in both
    checkpoint managers), so at most two stay. Without one (a single run): the latest two."""
    if tune:
        from ray.tune import CheckpointConfig
    else:
        from ray.train import CheckpointConfig

    if metric is None:
        return CheckpointConfig(num_to_keep=2)
    return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE,
                            checkpoint_score_order=mode or direction(metric))


def kept_checkpoints(run_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(best, latest) checkpoint directories of a Train run's directory (``<storage>/<name>``,
    from Train's snapshot) or of a Tune trial that trained in its function (its directory, from
    Tune's ``result.json``); (None, None) where there is none. Without a score the best is the
    latest."""
    run_dir = Path(run_dir)
    if not (run_dir / SNAPSHOT).is_file() and (run_dir / "result.json").is_file():
        return tune_trial_checkpoints(run_dir)
    try:
        state = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None, None
    ranked = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results") or []]  # worst .. best
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    best = ranked[-1] if ranked else latest
    return (run_dir / best if best else None), (run_dir / latest if latest else None)


def tune_trial_checkpoints(trial_dir: Path) -> tuple[Path | None, Path | None]:
    """(best, latest) of the checkpoints a Tune trial's directory still holds, each scored by
    the report that wrote it (Ray's ``Result.from_path``); a NaN score (not measured) is never
    the best."""
    import math

    from ray.tune import Result

    try:
        result = Result.from_path(str(trial_dir))
    except (RuntimeError, OSError, ValueError):
        return None, None
    kept = result.best_checkpoints or []  # by checkpoint index
    if not kept:
        return None, None
    mode = (result.metrics or {}).get("sweep_mode", "min")
    scored = [(m.get(CHECKPOINT_SCORE), c) for c, m in kept]
    scored = [(v, c) for v, c in scored if isinstance(v, (int, float)) and math.isfinite(v)]
    latest = Path(kept[-1][0].path)
    if not scored:
        return latest, latest
    best = (min if mode == "min" else max)(scored, key=lambda x: x[0])[1]
    return Path(best.path), latest


def trainer_for(cfg: RunConfig, storage_path: str, name: str, callbacks=None,
                tracking: TrialRecord | None = None, metric: str | None = None, mode: str | None = None):
    """The TorchTrainer for ``cfg`` (used by the CLI and by each Tune trial); ``tracking`` names
    the trial's MLflow run, into which rank 0 logs; ``metric`` and ``mode`` (a sweep's): keep
    the best checkpoint by it besides the latest (:func:`checkpoint_config`)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    loop_config = {"run": cfg.model_dump(mode="json"), "tracking": tracking, "submitted": time.time()}
    if metric is not None:  # each checkpoint's report carries it as its score
        loop_config["score"] = {"metric": metric, "key": CHECKPOINT_SCORE}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu,
                                     resources_per_worker=worker_resources(cfg),
                                     placement_strategy=d.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RayRunConfig(name=name, storage_path=storage_path,
                                failure_config=FailureConfig(max_failures=d.max_failures),
                                checkpoint_config=checkpoint_config(metric, mode),
                                callbacks=callbacks,
                                # Train's INFO lines (each report's metrics dict, every checkpoint's
                                # path, the worker group's start) stay in the session's log files;
                                # the console shows its warnings and errors (ray/progress.py)
                                logging_config=LoggingConfig(log_level="WARNING"),
                                worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
