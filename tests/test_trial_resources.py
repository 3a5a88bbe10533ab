"""What a sweep file's resources, failures, storage and tracking store become before anything
runs: the Ray objects a trial is built with, and the one-line refusals. (Seconds, no cluster.)"""

import pytest
import yaml

from plora_ray.ray.cluster import check_tracking_for_cluster, read_text, storage_join, storage_root, write_text
from plora_ray.config.io import build_run_config
from plora_ray.config.schema import ConfigError
from plora_ray.config.sweep import load_sweep
from plora_ray.config.trials import trial_run_config
from test_tune import base


def sweep_file(tmp_path, **fields):
    data = {"name": "r", "metric": "train/loss", "searcher": {"type": "grid"}, "base": base(),
            "space": {"optim.lr": {"grid": [1e-3]}}}
    data.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trial_trainer(spec, tmp_path):
    from plora_ray.ray.trainer import trainer_for

    return trainer_for(trial_run_config(spec, {"optim.lr": 1e-3}), str(tmp_path / "ray"), "x")


def test_fractional_gpus_per_worker_reach_ray_train_as_given(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, resources={"workers": 2, "cpus_per_worker": 3, "gpus_per_worker": 0.5,
                                                      "placement_strategy": "STRICT_PACK"}))
    scaling = trial_trainer(spec, tmp_path).scaling_config
    assert scaling.use_gpu and scaling.num_workers == 2
    assert scaling.resources_per_worker == {"CPU": 3.0, "GPU": 0.5}  # not Ray's default of 1 GPU
    assert scaling.total_resources == {"CPU": 6.0, "GPU": 1.0}  # two workers on one GPU
    assert scaling.placement_strategy == "STRICT_PACK"


def test_a_run_config_takes_fractional_gpus_and_refuses_what_ray_cannot_place():
    cfg = build_run_config({"method": "lora", "distributed": {"use_gpu": True, "gpus_per_worker": 0.25}})
    from plora_ray.ray.trainer import worker_resources

    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": 0.25}
    assert worker_resources(build_run_config({"method": "lora", "distributed": {"use_gpu": True}}))["GPU"] == 1.0
    assert "GPU" not in worker_resources(build_run_config({"method": "lora"}))
    for dist, fragment in [({"use_gpu": True, "gpus_per_worker": 1.5}, "a fraction below 1 or a whole number"),
                           ({"gpus_per_worker": 0.5}, "needs distributed.use_gpu: true"),
                           ({"placement_strategy": "PACKED"}, "distributed.placement_strategy")]:
        with pytest.raises(ConfigError, match=fragment):
            build_run_config({"method": "lora", "distributed": dist})


def test_sweep_resources_refuse_gpus_ray_cannot_place_and_distributed_paths_they_own(tmp_path):
    with pytest.raises(ConfigError, match="resources.gpus_per_worker.*fraction below 1"):
        load_sweep(sweep_file(tmp_path, resources={"gpus_per_worker": 2.5}))
    for path, owner in [("distributed.gpus_per_worker", "resources.gpus_per_worker"),
                        ("distributed.placement_strategy", "resources.placement_strategy"),
                        ("distributed.max_failures", "failures.worker_restarts")]:
        with pytest.raises(ConfigError, match=f"set {owner} instead"):
            load_sweep(sweep_file(tmp_path, fixed={path: 1}))


def test_failures_default_to_one_restart_and_one_retry_and_reach_train_and_tune(tmp_path):
    from plora_ray.sweep.context import SweepContext
    from plora_ray.sweep.tune import build_tuner

    spec = load_sweep(sweep_file(tmp_path))
    assert (spec.failures.worker_restarts, spec.failures.trial_retries) == (1, 1)
    assert trial_trainer(spec, tmp_path).run_config.failure_config.max_failures == 1
    spec = load_sweep(sweep_file(tmp_path, base=base(distributed={"max_failures": 3})))
    assert trial_trainer(spec, tmp_path).run_config.failure_config.max_failures == 3  # the base's own value
    spec = load_sweep(sweep_file(tmp_path, failures={"worker_restarts": 0, "trial_retries": 4}))
    assert trial_trainer(spec, tmp_path).run_config.failure_config.max_failures == 0
    sweep = SweepContext(name="r-1", storage=str(tmp_path), tracking_uri="", experiment_id="", parent_run_id="",
                         spec=spec.model_dump(mode="json"))
    tuner = build_tuner(spec, sweep)
    assert tuner._local_tuner.get_run_config().failure_config.max_failures == 4
    with pytest.raises(ConfigError, match="failures.trial_retries"):
        load_sweep(sweep_file(tmp_path, failures={"trial_retries": -2}))


def test_local_tracking_stores_are_refused_on_more_than_one_node_only():
    for uri in ["sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "./mlruns"]:
        check_tracking_for_cluster(uri, 1)
        with pytest.raises(ConfigError, match="--tracking-uri: .* 3 nodes.*mlflow server"):
            check_tracking_for_cluster(uri, 3)
    check_tracking_for_cluster("http://10.0.0.5:5000", 3)
    check_tracking_for_cluster("databricks", 3)


def test_storage_uris_are_passed_through_and_local_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_root("runs/s") == str(tmp_path / "runs" / "s")
    assert storage_root("s3://bucket/sweeps/") == "s3://bucket/sweeps"
    assert storage_join("gs://b/s", "x.json") == "gs://b/s/x.json"
    uri = f"file://{tmp_path}/store"  # a URI, written through pyarrow as Ray writes s3:// or gs://
    assert read_text(storage_join(uri, "t.latest.json")) is None
    write_text(storage_join(uri, "t.latest.json"), '{"a": 1}')
    assert (tmp_path / "store" / "t.latest.json").read_text() == '{"a": 1}'
    assert read_text(storage_join(uri, "t.latest.json")) == '{"a": 1}'


def test_a_storage_uri_needs_a_tracking_server_and_a_scheme_ray_writes(tmp_path, capsys):
    from plora_ray.cli.tune import main

    space = sweep_file(tmp_path)
    cases = [(["--storage", "s3://bucket/sweeps"], "give --tracking-uri"),
             (["--storage", "ftp://host/sweeps", "--tracking-uri", "http://h:5000"], "'ftp://' is not a storage"),]
    for extra, fragment in cases:
        assert main([str(space), "--dry-run", *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and fragment in err[0], err
    assert main([str(space), "--dry-run", "--storage", "s3://bucket/sweeps", "--tracking-uri", "http://h:5000"]) == 0


def test_one_worker_trials_train_in_their_tune_function_which_holds_the_workers_resources(tmp_path):
    from plora_ray.config.trials import one_process_trials
    from plora_ray.sweep.tune import TRIAL_RESOURCES, trial_failures, trial_resources

    spec = load_sweep(sweep_file(tmp_path, resources={"workers": 1, "cpus_per_worker": 2}))
    assert one_process_trials(spec) and trial_resources(spec) == {"cpu": 2}
    assert trial_failures(spec) == 2  # its one retry and its worker's one restart: both are Tune's
    spec = load_sweep(sweep_file(tmp_path, resources={"gpus_per_worker": 0.5}, failures={"worker_restarts": -1}))
    assert trial_resources(spec) == {"cpu": 1, "gpu": 0.5} and trial_failures(spec) == -1
    for other in [{"resources": {"workers": 2}}, {"base": base(distributed={"engine": "deepspeed"})},
                  {"space": {"distributed.engine": {"grid": ["ddp", "deepspeed"]}}}]:
        spec = load_sweep(sweep_file(tmp_path, **other))  # a Ray Train run per trial
        assert not one_process_trials(spec) and trial_resources(spec) == TRIAL_RESOURCES
        assert trial_failures(spec) == spec.failures.trial_retries == 1
