"""A run in this one process (CPU or one GPU, no Ray): train, checkpoint, write the run directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.run.loop import fit, setup
from plora_ray.run.rundir import CHECKPOINT, config_yaml, load_run_checkpoint, replace_dir
from plora_ray.run.rundir import save_run_checkpoint, write_run_dir


def local_device(cfg: RunConfig):
    """The one process's device: the first GPU with ``distributed.use_gpu``, else the CPU."""
    import torch

    if not cfg.distributed.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("field 'distributed.use_gpu': true, but no CUDA device is visible here: "
                          "set it to false or run on a GPU machine")
    return torch.device("cuda", torch.cuda.current_device())


def run_local(cfg: RunConfig, out: Path, resume: bool) -> dict:
    """One process: train, checkpoint into ``out/checkpoint`` every ``checkpoint_every_steps``
    and at the end, then write the run directory. Returns the summary."""
    run = setup(cfg, device=local_device(cfg))
    if resume:
        load_run_checkpoint(run, out / CHECKPOINT)
        print(f"resuming at step {run.start_step} of {len(run.steps)}")
    print(f"{cfg.method}: {sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} "
          f"trainable parameters, {len(run.examples)} examples, {len(run.steps)} steps, "
          f"global batch {cfg.global_batch_size}, output {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml(cfg))

    def on_checkpoint(run, final, scores):
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            save_run_checkpoint(run, Path(tmp) / CHECKPOINT)
            replace_dir(Path(tmp) / CHECKPOINT, out / CHECKPOINT)

    fit(run, on_checkpoint=on_checkpoint)
    return write_run_dir(run, out)
