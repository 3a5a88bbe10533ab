"""A PLoRA sweep: Ray Tune + Optuna over a search-space YAML, MLflow curves for every trial.

    python -m plora_ray.tune search_spaces/unload.yaml
    python -m plora_ray.tune search_spaces/joint.yaml --set num_samples=8 --dry-run
    python -m plora_ray.tune search_spaces/unload.yaml --resume       # continue the last sweep
    python -m plora_ray.tune FILE --address auto --storage /shared/sweeps --tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python -m plora_ray.tune FILE --storage s3://bucket/sweeps ...

One trial = one Ray Train TorchTrainer run (``ray/trainer.py: trainer_for``) built by a Tune
function that asks for a sliver of memory and no CPU (Train V2 refuses ``Tuner(TorchTrainer)``);
its workers take the trial's resources, so a node's CPUs all go to workers. On a cluster
(``--address``, or inside a Ray Job) the sweep refuses a tracking store only one machine
reaches once it sees more than one node, before any trial starts (``cluster.py``); failures
are handled at two levels (``failures`` in the sweep file): Train restarts a trial's worker
group from its last checkpoint when a worker or node is lost, Tune retries a trial that
failed anyway, and ``--resume`` continues a sweep whose driver died. The driver creates the MLflow experiment, a parent run for the
sweep and one nested run per trial (idempotent per trial id, so a restarted trial continues its
run, named from its searched values: ``u16 m0.1 r1 s0``); rank 0 of each trial logs the curves
into it. ``repeats: N`` runs every configuration with N seeds (separate trials). When Tune is
done, or the driver stops for any reason, every trial still RUNNING gets its end (finished /
stopped_early / failed), and the closing table (``summary.py``: each configuration's metric
with its 95 % interval, its difference to the best with a paired interval) is printed last
and stored on the sweep's run.
"""

from __future__ import annotations

import argparse
import sys

from plora_ray.assets.fetch import AssetError
from plora_ray.config.schema import ConfigError
from plora_ray.assets.dialogues import DataError
from plora_ray.sweep.preflight import SweepFailed, check_sweep
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
