"""A PLoRA sweep: Ray Tune + Optuna over a search-space YAML, MLflow curves for every trial.

    python -m plora_ray.tune search_spaces/unload.yaml
    python -m plora_ray.tune search_spaces/joint.yaml --set num_samples=8 --dry-run
    python -m plora_ray.tune search_spaces/unload.yaml --resume       # continue the last sweep
    python -m plora_ray.tune FILE --address auto --storage /shared/sweeps --tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python -m plora_ray.tune FILE --storage s3://bucket/sweeps ...

A trial of one worker with the torch engine (the main command's) trains in its Tune function
(``ray/worker.py: trial_loop``), which holds that worker's resources: no Train controller or
worker group per trial, Tune keeps its checkpoints (the best by the metric and the latest) and
restarts it from the last one. Any other trial is one Ray Train TorchTrainer run
(``ray/trainer.py: trainer_for``) built by a Tune function that asks for a sliver of memory and
no CPU (Train V2 refuses ``Tuner(TorchTrainer)``); its workers take the trial's resources, so a
node's CPUs all go to workers. On a cluster
(``--address``, or inside a Ray Job) the sweep refuses a tracking store only one machine
reaches once it sees more than one node, before any trial starts (``ray/cluster.py``); failures
are handled at two levels (``failures`` in the sweep file): Train restarts a trial's worker
group from its last checkpoint when a worker or node is lost, Tune retries a trial that
failed anyway (a one-worker trial: Tune does both, from its last checkpoint), and ``--resume``
continues a sweep whose driver died. The driver creates the
MLflow experiment, a parent run for the sweep and one nested run per trial (idempotent per trial id, so a restarted trial continues its
run, named from its searched values: ``u16 m0.1 r1 s0``); rank 0 of each trial logs the curves
into it. ``repeats: N`` runs every configuration with N seeds (separate trials). When Tune is
done, or the driver stops for any reason, every trial still RUNNING gets its end (finished /
stopped_early / failed), and the closing table (``analysis/summary.py``: each configuration's metric
with its 95 % interval, its difference to the best with a paired interval) is printed last
and stored on the sweep's run. On the way, the console shows each trial's step of its total
with an estimate of its time left, and the sweep's trials done with an estimate of its own
(``ray/progress.py``), without Ray's lines that do not concern the user.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from unittest import mock

from plora_ray.config.schema import ConfigError
from plora_ray.ray.progress import driver_console
from plora_ray.sweep.context import SweepContext
from plora_ray.sweep.preflight import raise_if_every_trial_failed

driver_console()  # before this process imports Ray: which worker lines the console shows

# the Tune function of a trial that only waits on its TorchTrainer: no CPU (a node's CPUs are for
# workers: with a sliver of CPU two trial functions on a 1-CPU node left no room for a worker)
# and a sliver of memory (Tune refuses a request with nothing in it)
TRIAL_RESOURCES = {"cpu": 0, "memory": 1 << 20}
DIVERGED_PENALTY = {"min": 1e6, "max": -1.0}  # what the searcher sees for a diverged trial
# Tune's settings for the sweep's fit() (a user's own values win): build_tuner's loggers only;
# no warning that the experiment's state was saved twice within 5 s, which Tune does after
# every trial checkpoint when it keeps one per trial, and two trials checkpoint together
TUNE_SETTINGS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                 "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
TRIALS = "trials"  # under the sweep's storage: each Train trial's run, <sweep name>-<trial id>


def trial_function(config: dict, sweep: SweepContext) -> None:
    """The Tune trainable: build this trial's run config and its MLflow run, then train it, in
    this function where every trial of the sweep is one process (``one_process_trials``), else
    as a Ray Train TorchTrainer run."""
    started = time.time()
    from ray import tune

    from plora_ray.ray.cluster import storage_join
    from plora_ray.config.spec import SweepSpec
    from plora_ray.config.trials import one_process_trials, trial_run_config, trial_values
    from plora_ray.ray.trainer import CHECKPOINT_SCORE
    from plora_ray.tracking.driver import TrialRecord, set_trial_status, trial_run
    from plora_ray.tracking.naming import active_params, logged_config, run_name, trial_tags

    spec = SweepSpec.model_validate(sweep.spec)
    trial_id = tune.get_context().get_trial_id()
    values = trial_values(config)
    cfg = trial_run_config(spec, config)
    name = run_name(values, cfg.seed, trial_id)
    cfg.name = name  # the progress lines say which trial they come from
    run_cfg = cfg.model_dump(mode="json")
    inline = one_process_trials(spec)
    # where the trial's checkpoints (and ledger) go: its Tune directory, or its Train run's
    train_run = f"{sweep.name}-{trial_id}"
    where = storage_join(sweep.storage, sweep.name, trial_id) if inline else storage_join(sweep.storage, TRIALS, train_run)
    run_id = trial_run(sweep.tracking_uri, sweep.experiment_id, sweep.parent_run_id, trial_id,
                       name, active_params(run_cfg), trial_tags(values, cfg.seed), logged_config(run_cfg, where))
    tracking = TrialRecord(sweep.tracking_uri, run_id)
    if inline:
        from plora_ray.ray.worker import trial_loop

        diverged = trial_loop(cfg, tracking, {"metric": spec.metric, "key": CHECKPOINT_SCORE},
                              lambda metrics: sweep_keys(metrics, spec), started)
        set_trial_status(sweep.tracking_uri, run_id, "diverged" if diverged else "finished")
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from plora_ray.ray.trainer import trainer_for

    trainer = trainer_for(cfg, storage_join(sweep.storage, TRIALS), train_run,
                          callbacks=[TuneReportCallback()],
                          tracking=tracking, metric=spec.metric, mode=spec.mode)
    result = trainer.fit()  # a failure or an early stop is recorded by the driver (reconcile)
    metrics = dict(result.metrics or {})
    metrics["checkpoint_path"] = result.checkpoint.path if result.checkpoint else ""  # the latest
    # the trial's best checkpoint by the sweep's metric (kept besides the latest: ray/trainer.py)
    metrics["best_checkpoint_path"] = (result.best_checkpoints[-1][0].path if result.best_checkpoints
                                       else metrics["checkpoint_path"])
    set_trial_status(sweep.tracking_uri, run_id, "diverged" if metrics.get("diverged") else "finished")
    sweep_keys(metrics, spec)
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})


def sweep_keys(metrics: dict, spec) -> None:
    """What a trial's report to Tune adds: the sweep's metric and mode (the export of a sweep
    directory reads them) and, for a diverged trial, a penalty as the metric (the searcher sees
    it as bad)."""
    metrics["sweep_metric"], metrics["sweep_mode"] = spec.metric, spec.mode
    if metrics.get("diverged"):
        metrics[spec.metric] = DIVERGED_PENALTY[spec.mode]


def trial_resources(spec) -> dict:
    """What Tune reserves for a trial's function: the trial's one worker where it trains there
    (``one_process_trials``), else nothing but a sliver of memory (its Train workers take
    theirs)."""
    from plora_ray.config.trials import one_process_trials

    if not one_process_trials(spec):
        return TRIAL_RESOURCES
    r = spec.resources
    return {"cpu": r.cpus_per_worker, **({"gpu": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}


def trial_failures(spec) -> int:
    """Tune's ``max_failures``: a trial's retries, plus its worker's restarts where the trial
    trains in its function (Tune restarts it from its last checkpoint in both cases); -1: no limit."""
    from plora_ray.config.trials import one_process_trials

    f = spec.failures
    if not one_process_trials(spec):
        return f.trial_retries
    return -1 if -1 in (f.trial_retries, f.worker_restarts) else f.trial_retries + f.worker_restarts


def _trial_name(spec):
    """Tune's trial names = the MLflow run names, so its tables and MLflow agree. Built from the
    raw trial data (no validation here: a bad trial must fail in its trial, not in the driver)."""
    from plora_ray.config.trials import trial_data, trial_values
    from plora_ray.tracking.naming import run_name

    return lambda trial: run_name(trial_values(trial.config), trial_data(spec, trial.config).get("seed", 0),
                                  trial.trial_id)


def build_tuner(spec, sweep: SweepContext, restore_path: str | None = None):
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    from plora_ray.ray.placement import OrphanedPlacementGroups
    from plora_ray.ray.progress import sweep_progress
    from plora_ray.ray.trainer import checkpoint_config
    from plora_ray.sweep.space import tune_param_space

    trainable = tune.with_resources(tune.with_parameters(trial_function, sweep=sweep), trial_resources(spec))
    # what Tune's table of a finished trial shows (read by tune.run as Ray's own trainables set it,
    # ray/tune/progress_reporter.py: _detect_progress_metrics); else all 20 keys of its last report
    trainable._progress_metrics = list(dict.fromkeys([spec.metric, "train/loss", "step", "total_steps",
                                                      "samples", "time_total_s"]))
    if restore_path:
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
    s, num_samples = spec.searcher, spec.num_samples
    if s.type == "optuna":
        import optuna

        searcher = OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=optuna.samplers.TPESampler(seed=s.seed))
        if spec.repeats > 1:  # Optuna sees one trial per configuration, the mean of its seeds
            searcher = Repeater(searcher, repeat=spec.repeats, set_index=True)
            num_samples *= spec.repeats
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
    else:  # repeats: a grid axis of seed indices (search_space.tune_param_space)
        searcher = BasicVariantGenerator(random_state=s.seed, max_concurrent=spec.max_concurrent)
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  max_t=spec.scheduler.max_t or 10**6)
    else:
        scheduler = FIFOScheduler()
    # a trial actor is reused for the next trial (no new process and imports: ~22 s a trial on 2
    # cores) only where every trial's function returns before its actor is: not under ASHA,
    # where Tune resets the actor of a trial it stopped while its Train run is still ending,
    # fails the reset after TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s) and with it the *next* trial,
    # before that one ever ran (ray.tune.execution.tune_controller._on_trial_reset)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=num_samples,
                                    reuse_actors=spec.scheduler.type != "asha",
                                    trial_name_creator=_trial_name(spec),
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        # the sweep's progress line on the console (ray/progress.py); Tune's CSV and JSON
        # results, not its TensorBoard files (no one reads them; Tune would print a hint to
        # them): fit() runs with TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 (run_sweep)
        run_config=ray.tune.RunConfig(name=sweep.name, storage_path=sweep.storage,
                                      callbacks=[sweep_progress(sweep.name), OrphanedPlacementGroups(),
                                                 CSVLoggerCallback(), JsonLoggerCallback()],
                                      # a trial that trains in its function: Tune keeps its best
                                      # checkpoint by the metric and its latest (ray/trainer.py)
                                      checkpoint_config=checkpoint_config(spec.metric, spec.mode, tune=True),
                                      failure_config=ray.tune.FailureConfig(max_failures=trial_failures(spec))),
    )


def trial_outcomes(results) -> dict[str, str]:
    """How each trial Tune knows of ended: failed (an error), finished or diverged (its final
    report), stopped_early (stopped by the scheduler after reporting)."""
    outcome = {}
    for res in results:
        tid = (res.metrics or {}).get("trial_id")
        if tid is None:  # never reported: end_running_trials' default (failed) covers it
            continue
        final = (res.metrics or {}).get("final")
        outcome[tid] = ("failed" if res.error is not None else "stopped_early" if not final
                        else "diverged" if (res.metrics or {}).get("diverged") else "finished")
    return outcome


def summarize(spec, sweep: SweepContext, results=None) -> str:
    """The closing table (stored on the sweep's run) and where to look further."""
    from analysis.summary import log_summary, sweep_summary
    from plora_ray.tracking.driver import mlflow_ui_command

    summary = sweep_summary(sweep.tracking_uri, sweep.parent_run_id, spec.metric, spec.mode)
    table = log_summary(sweep.tracking_uri, sweep.parent_run_id, summary)
    lines = [f"sweep {sweep.name}: {spec.mode} {spec.metric}", table]
    try:  # the single best trial's weights, whatever the intervals say about its lead
        best = results.get_best_result(metric=spec.metric, mode=spec.mode, filter_nan_and_inf=True)
        m = best.metrics or {}
        path = m.get("best_checkpoint_path") or trial_best_checkpoint(sweep.storage, sweep.name, m.get("trial_id"))
        if path:
            lines.append(f"checkpoint of the top trial: {path}")
            lines.append(export_command(path, sweep))
    except Exception:  # no results, or no trial reported the metric
        pass
    return "\n".join([*lines, f"compare the runs: {mlflow_ui_command(sweep.tracking_uri)}"])


def trial_best_checkpoint(storage: str, sweep_name: str, trial_id: str | None) -> str | None:
    """The best checkpoint a trial kept (its Train run's, for a trial stopped early, whose
    function never reported it; or, a trial that trained in its function, its Tune
    directory's), read from local storage; None where unknown."""
    from plora_ray.ray.cluster import is_uri, storage_join
    from plora_ray.ray.trainer import kept_checkpoints

    if not trial_id or is_uri(storage):
        return None
    best, _ = kept_checkpoints(storage_join(storage, TRIALS, f"{sweep_name}-{trial_id}"))
    if best is None:  # a trial that trained in its Tune function: its Tune directory
        best, _ = kept_checkpoints(storage_join(storage, sweep_name, trial_id))
    return str(best) if best is not None and best.is_dir() else None


def export_command(checkpoint: str, sweep: SweepContext) -> str:
    """The command that turns the top trial's best checkpoint into a Hugging Face model folder
    (``python -m plora_ray.export``); a checkpoint in remote storage is named by its URI."""
    from plora_ray.ray.cluster import is_uri

    if is_uri(sweep.storage) and "://" not in checkpoint:
        checkpoint = f"{sweep.storage.split('://', 1)[0]}://{checkpoint}"
    return f"export it: python -m plora_ray.export {checkpoint} exports/{sweep.name}"


def run_sweep(spec, space: str, storage: str, resume: bool = False, address: str | None = None,
              tracking_uri: str | None = None, report: bool = True) -> str:
    """Run the sweep of ``spec`` (read from the file ``space``) and return the closing text;
    ``resume`` continues its last run under ``storage``. Raises ConfigError, SweepFailed."""
    from plora_ray.ray.cluster import (alive_nodes, check_tracking_for_cluster, cluster_address, is_uri, read_text, storage_join,
                          storage_root, write_text)
    from plora_ray.ray.local import ensure_ray
    from plora_ray.ray.placement import release_leaked
    from plora_ray.tracking.driver import default_tracking_uri, end_running_trials, ensure_experiment, finish_sweep, start_sweep_run

    storage = storage_root(storage)
    if not is_uri(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    latest = storage_join(storage, f"{spec.name}.latest.json")
    earlier = read_text(latest) if resume else None
    if resume and earlier is None:
        raise ConfigError(f"--resume: no earlier sweep of '{spec.name}' under {storage}: run it without --resume")
    uri = json.loads(earlier)["tracking_uri"] if earlier else tracking_uri or default_tracking_uri(storage)
    address = cluster_address(address)
    # a local cluster counts one logical CPU more than the cores, as before the trials' Tune
    # functions stopped taking CPU: a stopped trial's worker reservation is released a while
    # after its trial ends, and without the spare CPU the next trial waited on it (a sweep with
    # ASHA hung on 2 cores); a cluster: as it is
    ensure_ray(address, num_cpus=None if address else (os.cpu_count() or 1) + 1)
    check_tracking_for_cluster(uri, len(alive_nodes()))  # before the first MLflow write or trial
    if address:  # groups a killed driver of this cluster left reserved (plora_ray/ray/placement.py)
        release_leaked("at the start")
    if earlier:
        sweep = SweepContext.from_json(earlier)
    else:
        experiment_id = ensure_experiment(uri, spec.name)
        name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = start_sweep_run(uri, experiment_id, name, Path(space),
                                 {"plora.metric": spec.metric, "plora.mode": spec.mode, "plora.repeats": spec.repeats})
        sweep = SweepContext(name, storage, uri, experiment_id, parent, spec.model_dump(mode="json"))
        write_text(latest, sweep.to_json())
    uri, parent, ended = sweep.tracking_uri, sweep.parent_run_id, False
    def terminate(signum, frame):
        """SIGTERM (``ray job stop``, a scheduler's kill; SIGKILL follows within seconds): the
        trials and the sweep's run are ended in MLflow first, then the sweep stops as on Ctrl-C;
        ``--resume`` continues it."""
        end_running_trials(uri, parent)
        finish_sweep(uri, parent, status="FAILED")
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        restore = storage_join(storage, sweep.name) if resume else None
        with mock.patch.dict(os.environ, TUNE_SETTINGS | {k: v for k, v in os.environ.items() if k in TUNE_SETTINGS}):
            results = build_tuner(spec, sweep, restore).fit()
        end_running_trials(uri, parent, trial_outcomes(results))
        text = summarize(spec, sweep, results)
        finish_sweep(uri, parent)
        ended = True
        if address:
            release_leaked("at the end")
    finally:  # an exception, Ctrl-C or SIGTERM: no trial (and not the sweep) is left RUNNING
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if not ended:
            end_running_trials(uri, parent)
            finish_sweep(uri, parent, status="FAILED")
    raise_if_every_trial_failed(results, text)
    if report:
        reports = Path("runs/reports") if is_uri(storage) else Path(storage) / "reports"
        written = write_sweep_report(uri, spec.name, parent, reports / sweep.name)
        lines = text.splitlines()  # the report's path just before the closing `mlflow ui` line
        text = "\n".join(lines[:-1] + [written] + lines[-1:])
    return text


def write_sweep_report(uri: str, experiment: str, parent: str, out: Path) -> str:
    """The analysis report of the sweep (tables, figures, learning ability, importance), also
    logged to the sweep's run; a failure here loses nothing (the runs are in MLflow)."""
    from analysis import write_report
    from analysis.store import AnalysisError, no_progress_bar

    try:
        with no_progress_bar():  # MLflow's bar per per-item download: not the console's business
            path = write_report(uri, experiment, parent, out)
    except (AnalysisError, OSError, ValueError, RuntimeError) as exc:
        return (f"report not written ({exc}); retry: python -m analysis report --experiment {experiment} "
                f"--sweep {parent} --tracking-uri {uri}")
    return f"report: {path}"
