"""A run on Ray from the driver's side: start the TorchTrainer of ``cfg`` and write the run
directory from its final checkpoint, as a one-process run writes it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from plora_ray.config.schema import RunConfig
from plora_ray.ray.local import ensure_ray
from plora_ray.ray.trainer import trainer_for
from plora_ray.run.rundir import CHECKPOINT, config_yaml, restore_run, write_run_dir


class DistributedError(Exception):
    """A Ray run that failed (a worker group error, no cluster); one line for the user."""


def run_distributed(cfg: RunConfig, out: Path, name: str, address: str | None = None) -> dict:
    """Run ``cfg`` on Ray and write the run directory ``out`` (as a one-process run does) from
    the final checkpoint. Returns the summary. Raises DistributedError, FloatingPointError."""
    import ray.exceptions
    import ray.train

    try:
        ensure_ray(address)
        storage = cfg.distributed.storage_path or str((out / "ray").resolve())
        result = trainer_for(cfg, storage, name).fit()
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


def run_ray(cfg: RunConfig, out: Path, resume: bool, address: str | None) -> dict:
    """The CLI's Ray run in ``out``: a new Ray run (its name kept in ``out/ray_run_name``), or with
    ``resume`` the one named there. Returns the summary."""
    d = cfg.distributed
    out.mkdir(parents=True, exist_ok=True)
    name_file = out / "ray_run_name"
    if resume and name_file.exists():
        name = name_file.read_text().strip()
    else:
        name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name_file.write_text(name)
        (out / "config.yaml").write_text(config_yaml(cfg))
    print(f"{cfg.method} on {d.workers} worker(s), engine {d.engine}"
          f"{f' ZeRO-{d.zero_stage}' if d.engine == 'deepspeed' else ''}, global batch "
          f"{cfg.global_batch_size}, Ray run {name}, output {out}")
    return run_distributed(cfg, out, name, address)
