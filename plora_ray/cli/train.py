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
from pathlib import Path

from plora_ray.assets.fetch import AssetError
from plora_ray.config.io import load_run_config
from plora_ray.config.schema import ConfigError
from plora_ray.ray.driver import DistributedError, run_ray
from plora_ray.assets.dialogues import DataError
from plora_ray.run.local import run_local
from plora_ray.run.rundir import check_resume, unique_dir
from plora_ray.sweep.preflight import check_run


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
