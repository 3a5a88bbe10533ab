"""A PLoRA sweep: Ray Tune + Optuna over a search-space YAML, MLflow curves for every trial.

    python -m plora_ray.tune search_spaces/unload.yaml
    python -m plora_ray.tune search_spaces/joint.yaml --set num_samples=8 --dry-run
    python -m plora_ray.tune search_spaces/unload.yaml --resume       # continue the last sweep

One trial = one Ray Train TorchTrainer run (``distributed.trainer_for``) built by a Tune
function that asks for a sliver of CPU (Train V2 refuses ``Tuner(TorchTrainer)``); its workers
take the trial's resources. The driver creates the MLflow experiment, a parent run for the
sweep and one nested run per trial (idempotent per trial id, so a restarted trial continues its
run); rank 0 of each trial logs the curves into it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .assets import AssetError
from .config import ConfigError
from .data import DataError
from .preflight import SweepFailed, check_sweep, raise_if_every_trial_failed

DIVERGED_PENALTY = {"min": 1e6, "max": -1.0}  # what the searcher sees for a diverged trial


def trial_function(config: dict, sweep: dict) -> None:
    """The Tune trainable: build this trial's run config, its MLflow run, its TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .distributed import trainer_for
    from .search_space import SweepSpec, trial_run_config
    from .tracking import set_trial_status, trial_run

    spec = SweepSpec.model_validate(sweep["spec"])
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    params = {k: v for k, v in config.items()}
    cfg = trial_run_config(spec, params, name=trial_name)
    run_id = trial_run(sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"], trial_id,
                       trial_name, cfg.model_dump(mode="json"))
    tracking = {"uri": sweep["tracking_uri"], "run_id": run_id}
    storage = str(Path(sweep["storage"]) / "trials")
    trainer = trainer_for(cfg, storage, f"{sweep['name']}-{trial_id}", callbacks=[TuneReportCallback()],
                          tracking=tracking)
    result = trainer.fit()  # a failure or an early stop is recorded by the driver (summarize)
    metrics = dict(result.metrics or {})
    metrics["checkpoint_path"] = result.checkpoint.path if result.checkpoint else ""
    if metrics.get("diverged"):
        set_trial_status(sweep["tracking_uri"], run_id, "diverged")
        metrics[spec.metric] = DIVERGED_PENALTY[spec.mode]  # the searcher sees it as bad
    else:
        set_trial_status(sweep["tracking_uri"], run_id, "finished")
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})


def build_tuner(spec, sweep: dict, restore_path: str | None = None):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from .search_space import tune_param_space

    trainable = tune.with_resources(tune.with_parameters(trial_function, sweep=sweep), {"cpu": 0.01})
    if restore_path:
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
    s = spec.searcher
    if s.type == "optuna":
        import optuna

        searcher = OptunaSearch(metric=spec.metric, mode=spec.mode,
                                sampler=optuna.samplers.TPESampler(seed=s.seed))
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
    else:
        searcher = BasicVariantGenerator(random_state=s.seed, max_concurrent=spec.max_concurrent)
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  max_t=spec.scheduler.max_t or 10**6)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=spec.num_samples),
        run_config=ray.tune.RunConfig(name=sweep["name"], storage_path=sweep["storage"],
                                      failure_config=ray.tune.FailureConfig(max_failures=1)),
    )


def summarize(spec, results, sweep: dict) -> str:
    from .search_space import trial_values
    from .tracking import finish_sweep, mlflow_ui_command, set_trial_status, sweep_trials

    rows = sweep_trials(sweep["tracking_uri"], sweep["parent_run_id"])
    outcome = {}
    for res in results:  # a trial stopped by ASHA or failed never reached its own status line
        tid = (res.metrics or {}).get("trial_id") or getattr(res, "trial_id", None)
        if res.error is not None:
            outcome[tid] = "failed"
        elif (res.metrics or {}).get("final"):
            outcome[tid] = "finished"
        else:
            outcome[tid] = "stopped_early"
    for r in rows:
        if r["status"] == "running":
            r["status"] = outcome.get(r.get("trial_id"), "failed")
            set_trial_status(sweep["tracking_uri"], r["run_id"], r["status"])
    lines = [f"sweep {sweep['name']}: {len(rows)} trials, metric {spec.metric} ({spec.mode})"]
    paths = [p.strip() for key in spec.space for p in key.split(",")]
    for r in sorted(rows, key=lambda r: r.get("trial_id", "")):
        value = r["metrics"].get(spec.metric)
        shown = " ".join(f"{k}={r['params'].get(k)}" for k in paths)
        lines.append(f"  {r.get('trial_id', '?'):>12}  {r['status']:<13} {spec.metric}="
                     f"{'-' if value is None else f'{value:.4f}'}  {shown}")
    best = None
    try:
        best = results.get_best_result(metric=spec.metric, mode=spec.mode, filter_nan_and_inf=True)
    except Exception:  # no trial reported the metric
        pass
    summary = {"trials": len(rows)}
    if best is not None and best.metrics and spec.metric in best.metrics:
        value = best.metrics[spec.metric]
        chosen = trial_values({k: best.config.get(k) for k in spec.space})
        ckpt = best.metrics.get("checkpoint_path") or "none"
        lines.append(f"best: {spec.metric}={value:.4f} with {json.dumps(chosen)}")
        lines.append(f"best checkpoint: {ckpt}")
        summary.update({"best_metric": value, "best_config": json.dumps(chosen), "best_checkpoint": ckpt})
    finish_sweep(sweep["tracking_uri"], sweep["parent_run_id"], summary)
    lines.append(f"compare the runs: {mlflow_ui_command(sweep['tracking_uri'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.tune", description=__doc__.split("\n")[0])
    parser.add_argument("space", help="search-space YAML (see search_spaces/)")
    parser.add_argument("--resume", action="store_true", help="continue the last sweep of this file")
    parser.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    parser.add_argument("--storage", default="runs/sweeps", help="Ray storage path (shared on a cluster)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<storage>/mlflow.db)")
    parser.add_argument("--dry-run", action="store_true", help="validate and describe the sweep, run nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the search-space file, e.g. --set num_samples=4")
    args = parser.parse_args(argv)
    try:
        from .search_space import describe, load_sweep

        spec = load_sweep(args.space, args.overrides)
        check_sweep(spec, args.storage, args.resume, args.tracking_uri)  # before Ray starts
        if args.dry_run:
            print(describe(spec))
            return 0
        print(run_sweep(spec, args))
    except (ConfigError, DataError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepFailed as exc:
        print(exc.summary)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_sweep(spec, args) -> str:
    from .distributed import ensure_ray
    from .tracking import default_tracking_uri, ensure_experiment, start_sweep_run

    storage = Path(args.storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    latest = storage / f"{spec.name}.latest.json"
    if args.resume:
        if not latest.exists():
            raise ConfigError(f"--resume: no earlier sweep of '{spec.name}' under {storage}: run it without --resume")
        sweep = json.loads(latest.read_text())
    else:
        uri = args.tracking_uri or default_tracking_uri(storage)
        experiment_id = ensure_experiment(uri, f"plora-{spec.name}")
        name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = start_sweep_run(uri, experiment_id, name, Path(args.space), {"plora.space_file": str(args.space)})
        sweep = {"name": name, "storage": str(storage), "tracking_uri": uri, "experiment_id": experiment_id,
                 "parent_run_id": parent, "spec": spec.model_dump(mode="json")}
        latest.write_text(json.dumps(sweep))
    ensure_ray(args.address)
    restore = str(storage / sweep["name"]) if args.resume else None
    results = build_tuner(spec, sweep, restore).fit()
    summary = summarize(spec, results, sweep)
    raise_if_every_trial_failed(results, summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())
