"""The Ray Train ``TorchTrainer`` of a run, built without importing the training stack.

A Tune trial's actor and Train's controller only build and drive the trainer; importing
:mod:`plora_ray.ray.worker` (torch's training loop, transformers, peft: ~5 s of CPU a process)
there would be start-up paid twice per trial. The workers import it when they run
:func:`train_loop` (one way only: the worker never imports this module).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from plora_ray.config.paths import CACHE_ENV, cache_root
from plora_ray.config.schema import RunConfig

if TYPE_CHECKING:  # mlflow stays out of the trial actor and Train's controller
    from plora_ray.tracking.driver import TrialRecord


def extensions_dir() -> str:
    """DeepSpeed JIT-builds small ops on first use; keep them in a cache we control."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache_root() / "torch_extensions")


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


def trainer_for(cfg: RunConfig, storage_path: str, name: str, callbacks=None,
                tracking: TrialRecord | None = None):
    """The TorchTrainer for ``cfg`` (used by the CLI and by each Tune trial); ``tracking`` names
    the trial's MLflow run, into which rank 0 logs."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    return TorchTrainer(
        train_loop,
        train_loop_config={"run": cfg.model_dump(mode="json"), "tracking": tracking, "submitted": time.time()},
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu,
                                     resources_per_worker=worker_resources(cfg),
                                     placement_strategy=d.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RayRunConfig(name=name, storage_path=storage_path,
                                failure_config=FailureConfig(max_failures=d.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                callbacks=callbacks,
                                worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
