"""MLflow tracking (plora_ray/tracking.py) against a real SQLite store in tmp_path."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from plora_ray import tracking

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """A freshly created (migrated) MLflow database: creating one takes 1.5-6 s, copying it
    takes milliseconds, so every test gets its own copy."""
    directory = tmp_path_factory.mktemp("template")
    uri = tracking.default_tracking_uri(directory)
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables
    return directory / tracking.DEFAULT_DB


def new_store(empty_db, directory):
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_db, directory / tracking.DEFAULT_DB)
    return tracking.default_tracking_uri(directory)


@pytest.fixture
def store(tmp_path, empty_db):
    uri = new_store(empty_db, tmp_path / "store")
    exp = tracking.ensure_experiment(uri, "plora-test")
    return uri, exp, mlflow.MlflowClient(tracking_uri=uri)


@pytest.fixture
def sweep(store, tmp_path):
    uri, exp, client = store
    space = tmp_path / "unload.yaml"
    space.write_text("sweep: {name: unload}\nspace:\n  plora.momentum: [0.0, 0.3]\n")
    parent = tracking.start_sweep_run(uri, exp, "unload", space, {"plora.scheduler": "asha"})
    return uri, exp, client, parent


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = tracking.default_tracking_uri("runs/sweep")
    assert uri == f"sqlite:////{(tmp_path / 'runs/sweep/mlflow.db').as_posix().lstrip('/')}"
    assert uri.startswith("sqlite:////")
    assert tracking.default_tracking_uri(Path("/abs/dir")) == "sqlite:////abs/dir/mlflow.db"
    assert tracking.DEFAULT_DB == "mlflow.db"


def test_experiment_created_once_with_local_artifact_root(store, tmp_path):
    uri, exp, client = store
    assert tracking.ensure_experiment(uri, "plora-test") == exp
    location = client.get_experiment(exp).artifact_location
    assert location == (tmp_path / "store" / "mlartifacts").as_posix()
    assert (tmp_path / "store" / "mlflow.db").is_file()
    other = tracking.ensure_experiment(uri, "other", artifact_root=tmp_path / "art")
    assert other != exp
    assert client.get_experiment(other).artifact_location == (tmp_path / "art").as_posix()


def test_sweep_run_tags_and_space_file_artifact(sweep):
    uri, exp, client, parent = sweep
    run = client.get_run(parent)
    tags = run.data.tags
    assert run.info.experiment_id == exp and run.info.run_name == "unload"
    assert tags["plora.sweep"] == "unload" and tags["plora.run_type"] == "sweep"
    assert tags["plora.scheduler"] == "asha"
    commit = tags["plora.git_commit"]
    repo = Path(tracking.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    assert commit == (head.stdout.strip() if head.returncode == 0 else "unknown")
    for package in ("ray", "peft", "torch", "transformers", "deepspeed", "mlflow"):
        assert tags[f"plora.version.{package}"] not in ("", None)
    assert tags["plora.version.mlflow"] == mlflow.__version__
    artifacts = [a.path for a in client.list_artifacts(parent, "search_space")]
    assert artifacts == ["search_space/unload.yaml"]
    local = client.download_artifacts(parent, "search_space/unload.yaml")
    assert "plora.momentum" in Path(local).read_text()


def test_trial_run_is_idempotent_and_nested(sweep):
    uri, exp, client, parent = sweep
    params = {"lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
              "plora": {"momentum": 0.3, "unload_every_samples": None}, "seed": 1}
    a = tracking.trial_run(uri, exp, parent, "t_00000", "trial_0", params)
    again = tracking.trial_run(uri, exp, parent, "t_00000", "trial_0", params)  # resume
    b = tracking.trial_run(uri, exp, parent, "t_00001", "trial_1", params)
    assert a == again and a != b
    run = client.get_run(a)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["plora.trial_id"] == "t_00000"
    assert run.info.run_name == "trial_0"
    assert run.data.params == {"lora.rank": "8", "lora.target_modules": '["q_proj", "v_proj"]',
                               "plora.momentum": "0.3", "plora.unload_every_samples": "None",
                               "seed": "1"}
    # a second sweep with the same trial ids gets its own runs
    parent2 = tracking.start_sweep_run(uri, exp, "unload-2", None, {})
    c = tracking.trial_run(uri, exp, parent2, "t_00000", "trial_0", params)
    assert c not in (a, b)
    assert [t["run_id"] for t in tracking.sweep_trials(uri, parent)] == [a, b]
    assert [t["run_id"] for t in tracking.sweep_trials(uri, parent2)] == [c]
    # a finished (or failed) trial that is restarted is set running again, same run
    tracking.set_trial_status(uri, a, "failed")
    assert tracking.trial_run(uri, exp, parent, "t_00000", "trial_0", params) == a
    run = client.get_run(a)
    assert run.info.status == "RUNNING" and run.data.tags["plora.status"] == "running"


def test_params_flattening_limits_and_relogging(sweep):
    uri, exp, client, parent = sweep
    flat = tracking.flatten_params({"a": {"b": {"c": 1}}, "e": {}, "flag": True,
                                    "weird key[0]": 2, "long": "x" * 7000})
    assert flat["a.b.c"] == "1" and flat["e"] == "{}" and flat["flag"] == "True"
    assert flat["weird key_0_"] == "2"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("[truncated]")
    many = {f"group{i}": {f"k{j}": j for j in range(30)} for i in range(5)}  # 150 > 100 per batch
    run_id = tracking.trial_run(uri, exp, parent, "big", "big", many)
    assert len(client.get_run(run_id).data.params) == 150
    # same params again, plus a changed value (kept as first logged), plus a new key: no error
    many["group0"]["k0"] = 99
    many["extra"] = "new"
    assert tracking.trial_run(uri, exp, parent, "big", "big", many) == run_id
    params = client.get_run(run_id).data.params
    assert len(params) == 151 and params["group0.k0"] == "0" and params["extra"] == "new"


def test_sanitize_key():
    assert tracking.sanitize_key("eval/mmlu/social_sciences") == "eval/mmlu/social_sciences"
    assert tracking.sanitize_key("train/loss") == "train/loss"
    assert tracking.sanitize_key("a:b c-d.e") == "a:b c-d.e"
    assert tracking.sanitize_key("layers[0].q_proj@x") == "layers_0_.q_proj_x"
    assert tracking.sanitize_key("/a//b/") == "a/b"
    assert tracking.sanitize_key("a/../b") == "a/__/b"
    assert tracking.sanitize_key("ünïcode") == "_n_code"
    long = tracking.sanitize_key("x" * 400)
    assert len(long) == 250 and long != tracking.sanitize_key("x" * 401)


def test_metrics_at_steps_and_unloads(sweep):
    uri, exp, client, parent = sweep
    run_id = tracking.trial_run(uri, exp, parent, "m", "m", {})
    logger = tracking.RunLogger(uri, run_id, flush_every=7, flush_seconds=None)
    for step in range(1, 21):
        logger.log_metrics({"train/loss": 3.0 / step, "train/lr": 1e-4, "train/samples": 24 * step,
                            "train/tokens_per_s": 300.0, "skip": None}, step)
        if step % 10 == 0:
            layers = {f"base_model.model.layers.{i}.self_attn.q_proj": step // 10 * 4
                      for i in range(2)}
            layers["weird[layer]"] = 3
            logger.log_unload(stage=step // 10, step=step, mean_rank=step / 10 * 4,
                              ranks_per_layer=layers, seconds=0.01,
                              output_change=0.0 if step == 10 else None)
    logger.log_metrics({"eval/gsm8k/strict": 0.1, "eval/mmlu/social_sciences": 0.3,
                        "eval/arc_challenge/acc_norm": 0.25}, 20)
    assert len(logger._buffer) < 7  # buffered until flush
    logger.flush()
    assert logger._buffer == []

    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, 21))
    assert [m.value for m in loss] == pytest.approx([3.0 / s for s in range(1, 21)])
    samples = client.get_metric_history(run_id, "train/samples")
    assert samples[-1].value == 480 and samples[-1].step == 20
    stage = client.get_metric_history(run_id, "plora/stage")
    assert [(m.step, m.value) for m in stage] == [(10, 1.0), (20, 2.0)]
    rank = client.get_metric_history(run_id, "plora/accumulated_rank")
    assert [(m.step, m.value) for m in rank] == [(10, 4.0), (20, 8.0)]
    per_layer = client.get_metric_history(
        run_id, "plora/accumulated_rank/base_model.model.layers.1.self_attn.q_proj")
    assert [(m.step, m.value) for m in per_layer] == [(10, 4.0), (20, 8.0)]
    assert [m.value for m in client.get_metric_history(
        run_id, "plora/accumulated_rank/weird_layer_")] == [3.0, 3.0]
    change = client.get_metric_history(run_id, "plora/output_change")
    assert [(m.step, m.value) for m in change] == [(10, 0.0)]
    assert len(client.get_metric_history(run_id, "plora/unload_seconds")) == 2
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/mmlu/social_sciences"] == 0.3 and "skip" not in metrics


def test_resumed_logger_skips_steps_already_logged(sweep):
    uri, exp, client, parent = sweep
    run_id = tracking.trial_run(uri, exp, parent, "r", "r", {})
    with tracking.RunLogger(uri, run_id) as first:
        for step in range(1, 8):   # the worker dies after step 7; checkpoint was at step 5
            first.log_metrics({"train/loss": float(step)}, step)
        first.log_metrics({"train/loss": float("nan")}, 8)
    # resumed from the step-5 checkpoint: steps 6..8 are re-run
    assert tracking.trial_run(uri, exp, parent, "r", "r", {}) == run_id
    with tracking.RunLogger(uri, run_id) as second:
        for step in range(6, 11):
            second.log_metrics({"train/loss": float(step), "eval/x": 1.0}, step)
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 11))
    assert math.isnan(history[7].value) and history[-1].value == 10.0
    assert len(client.get_metric_history(run_id, "eval/x")) == 5


@pytest.mark.parametrize("status,mlflow_status", [("finished", "FINISHED"),
                                                  ("stopped_early", "KILLED"),
                                                  ("diverged", "FAILED"),
                                                  ("failed", "FAILED")])
def test_statuses(sweep, status, mlflow_status):
    uri, exp, client, parent = sweep
    run_id = tracking.trial_run(uri, exp, parent, status, status, {})
    tracking.set_trial_status(uri, run_id, status)
    run = client.get_run(run_id)
    assert run.info.status == mlflow_status and run.info.end_time is not None
    assert run.data.tags["plora.status"] == status
    trials = tracking.sweep_trials(uri, parent)
    assert [(t["trial_id"], t["status"], t["mlflow_status"]) for t in trials] == [
        (status, status, mlflow_status)]


def test_unknown_status_is_refused(sweep):
    uri, exp, client, parent = sweep
    run_id = tracking.trial_run(uri, exp, parent, "x", "x", {})
    with pytest.raises(ValueError, match="unknown trial status 'done'"):
        tracking.set_trial_status(uri, run_id, "done")


def test_finish_sweep_and_summary(sweep):
    uri, exp, client, parent = sweep
    runs = []
    for i in range(3):
        run_id = tracking.trial_run(uri, exp, parent, f"t{i}", f"trial_{i}",
                                    {"plora": {"momentum": i / 10}})
        with tracking.RunLogger(uri, run_id) as logger:
            logger.log_metrics({"train/loss": 1.0 + i}, 1)
        tracking.set_trial_status(uri, run_id, "finished")
        runs.append(run_id)
    tracking.finish_sweep(uri, parent, {"best_trial_id": "t0", "best_run_id": runs[0],
                                        "metric": "train/loss", "mode": "min", "best_value": 1.0,
                                        "num_trials": 3, "best_config": {"plora.momentum": 0.0}})
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["plora.best_trial_id"] == "t0"
    assert run.data.tags["plora.best_run_id"] == runs[0]
    assert run.data.params["summary.best_config.plora.momentum"] == "0.0"
    assert run.data.params["summary.num_trials"] == "3"
    assert run.data.metrics["summary/best_value"] == 1.0
    assert "sweep_summary.json" in [a.path for a in client.list_artifacts(parent)]
    trials = tracking.sweep_trials(uri, parent)
    assert [t["trial_id"] for t in trials] == ["t0", "t1", "t2"]
    assert [t["metrics"]["train/loss"] for t in trials] == [1.0, 2.0, 3.0]
    assert trials[1]["params"] == {"plora.momentum": "0.1"}
    assert all(t["status"] == "finished" for t in trials)


def test_two_stores_in_one_process(tmp_path, empty_db):
    uris = [new_store(empty_db, tmp_path / name) for name in ("a", "b")]
    exps = [tracking.ensure_experiment(uri, "same-name") for uri in uris]
    parents = [tracking.start_sweep_run(uri, e, "s", None, {}) for uri, e in zip(uris, exps)]
    for uri, e, p in zip(uris, exps, parents):
        tracking.trial_run(uri, e, p, "only", "only", {"x": 1})
    for uri, p in zip(uris, parents):
        assert [t["trial_id"] for t in tracking.sweep_trials(uri, p)] == ["only"]
    assert mlflow.get_tracking_uri() not in uris  # no global state touched


def test_mlflow_ui_command(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    assert tracking.mlflow_ui_command(uri) == f"mlflow ui --backend-store-uri {uri} --port 5000"
    spaced = tracking.default_tracking_uri(tmp_path / "with space")
    assert tracking.mlflow_ui_command(spaced, port=5001) == (
        f"mlflow ui --backend-store-uri '{spaced}' --port 5001")
    assert tracking.compare_runs_url("http://h:1/", "3", ["a", "b"]) == (
        "http://h:1/#/compare-runs?runs=%5B%22a%22%2C%22b%22%5D&experiments=%5B%223%22%5D")
