"""A PLoRA sweep: Ray Tune + Optuna over a search-space YAML, MLflow curves for every trial.

    python -m plora_ray.tune search_spaces/unload.yaml
    python -m plora_ray.tune search_spaces/joint.yaml --set num_samples=8 --dry-run
    python -m plora_ray.tune search_spaces/unload.yaml --resume       # continue the last sweep
    python -m plora_ray.tune FILE --address auto --storage /shared/sweeps --tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python -m plora_ray.tune FILE --storage s3://bucket/sweeps ...

argparse -> exit codes only: the sweep itself (Tune, trials, tracking, the closing table) is
:mod:`plora_ray.sweep.tune`.
"""

from __future__ import annotations

import argparse
import sys

from plora_ray.assets.fetch import AssetError
from plora_ray.config.schema import ConfigError
from plora_ray.assets.dialogues import DataError
from plora_ray.sweep.preflight import SweepFailed, check_sweep, sweep_memory
from plora_ray.sweep.tune import run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.tune", description=__doc__.split("\n")[0])
    parser.add_argument("space", help="search-space YAML (see search_spaces/)")
    parser.add_argument("--resume", action="store_true", help="continue the last sweep of this file")
    parser.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: the "
                        "cluster of the Ray Job this runs in, else a local cluster started here)")
    parser.add_argument("--storage", default="runs/sweeps", help="Ray storage: a local path (on a multi-node "
                        "cluster one every node mounts), s3://... or gs://...")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<storage>/mlflow.db, "
                        "one machine only; on a cluster an MLflow server, http://HOST:PORT)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the analysis report (python -m analysis report) at the end")
    parser.add_argument("--dry-run", action="store_true", help="validate and describe the sweep, run nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the search-space file, e.g. --set num_samples=4")
    args = parser.parse_args(argv)
    try:
        from plora_ray.config.sweep import load_sweep
        from plora_ray.sweep.space import describe

        spec = load_sweep(args.space, args.overrides)
        check_sweep(spec, args.storage, args.resume, args.tracking_uri)  # before Ray starts
        if args.dry_run:
            print(describe(spec))
            if spec._check_paths:  # each trial's estimated peak memory (checked above)
                print("memory (estimated peak per worker: plora_ray.run.memory):")
                print("\n".join(sweep_memory(spec)))
            return 0
        print(run_sweep(spec, args.space, args.storage, resume=args.resume, address=args.address,
                        tracking_uri=args.tracking_uri, report=not args.no_report))
    except (ConfigError, DataError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepFailed as exc:
        print(exc.summary)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
