"""One training run, read top to bottom: config -> model -> data -> optimizer -> loop -> save.

    python -m plora_ray.train examples/tiny.yaml
    python -m plora_ray.train examples/tiny.yaml --set plora.momentum=0.1 --set lora.rank=1
    python -m plora_ray.train examples/tiny.yaml --workers 2 --engine deepspeed --zero 3
    python -m plora_ray.train examples/tiny.yaml --output runs/x --resume   # continue runs/x

One worker: one process (CPU or one GPU), no Ray. More workers (or DeepSpeed): Ray Train.
Both run the loop of ``plora_ray.run.loop`` and write the same run directory (``plora_ray.run.rundir``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from plora_ray.assets.fetch import AssetError
from plora_ray.config.schema import ConfigError, RunConfig, load_run_config
from plora_ray.run.data import DataError
from plora_ray.ray.worker import DistributedError
from plora_ray.run.loop import Run, fit, setup, train_step  # noqa: F401  (Run, train_step: older imports)
from plora_ray.run.rundir import CHECKPOINT, checkpoint_dir, config_yaml, load_run_checkpoint, replace_dir
from plora_ray.run.rundir import save_run_checkpoint, write_run_dir
from plora_ray.sweep.preflight import check_run


def unique_dir(path: Path) -> Path:
    """``path`` if unused, else ``path-2``, ``path-3``... (never overwrite a run)."""
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while Path(f"{path}-{n}").exists():
        n += 1
    return Path(f"{path}-{n}")


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

    def on_checkpoint(run, final):
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            save_run_checkpoint(run, Path(tmp) / CHECKPOINT)
            replace_dir(Path(tmp) / CHECKPOINT, out / CHECKPOINT)

    fit(run, on_checkpoint=on_checkpoint)
    return write_run_dir(run, out)


def run_ray(cfg: RunConfig, out: Path, resume: bool, address: str | None) -> dict:
    from plora_ray.ray.worker import run_distributed

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


def check_resume(cfg: RunConfig, out: Path) -> None:
    """Before any work: is there something to continue in ``out``?"""
    ray_run = cfg.distributed.workers > 1 or cfg.distributed.engine != "ddp"
    if ray_run and not (out / "ray_run_name").is_file():
        raise ConfigError(f"--resume: {out} holds no Ray run (no ray_run_name): check --output, or "
                          "drop --resume to start a new run")
    if not ray_run and checkpoint_dir(out / CHECKPOINT) is None:
        raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINT}: check --output, or drop "
                          "--resume to start a new run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run YAML (see examples/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set plora.momentum=0.1")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    parser.add_argument("--workers", type=int, help="Ray Train data-parallel workers (distributed.workers)")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], help="distributed.engine")
    parser.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage (distributed.zero_stage)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its last checkpoint")
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    args = parser.parse_args(argv)
    flags = {"distributed.workers": args.workers, "distributed.engine": args.engine,
             "distributed.zero_stage": args.zero}
    overrides = args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_run_config(args.config, overrides)
        if args.resume and not args.output:
            raise ConfigError("--resume needs --output DIR: the directory of the run to continue")
        out = Path(args.output or cfg.output_dir)
        check_run(cfg, out, args.resume)  # preflight: paths, model, data, before any work
        if args.resume:
            check_resume(cfg, out)
        else:
            out = unique_dir(out)
        d = cfg.distributed
        if d.workers == 1 and d.engine == "ddp":
            summary = run_local(cfg, out, args.resume)
        else:
            summary = run_ray(cfg, out, args.resume, args.address)
    except (ConfigError, DataError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: training diverged: {exc}: lower optim.lr or raise plora.momentum", file=sys.stderr)
        return 3
    except DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = f"{summary['steps']} steps, {summary['unloads']} unloads"
    if summary.get("replicas_identical") is not None:
        done += f", replicas identical: {summary['replicas_identical']}"
    print(f"done: {done}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
