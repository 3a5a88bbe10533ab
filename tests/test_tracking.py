"""MLflow tracking (plora_ray/tracking/) against a real SQLite store in tmp_path."""

import json
import math
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis.store import sweep_trials
from plora_ray.tracking import driver, naming, worker

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """A freshly created (migrated) MLflow database: creating one takes 1.5-6 s, copying it
    takes milliseconds, so every test gets its own copy."""
    directory = tmp_path_factory.mktemp("template")
    uri = driver.default_tracking_uri(directory)
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables
    return directory / driver.DEFAULT_DB


def new_store(empty_db, directory):
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_db, directory / driver.DEFAULT_DB)
    return driver.default_tracking_uri(directory)


@pytest.fixture
def store(tmp_path, empty_db):
    uri = new_store(empty_db, tmp_path / "store")
    exp = driver.ensure_experiment(uri, "plora-test")
    return uri, exp, mlflow.MlflowClient(tracking_uri=uri)


@pytest.fixture
def sweep(store, tmp_path):
    uri, exp, client = store
    space = tmp_path / "unload.yaml"
    space.write_text("sweep: {name: unload}\nspace:\n  plora.momentum: [0.0, 0.3]\n")
    parent = driver.start_sweep_run(uri, exp, "unload", space, {"plora.scheduler": "asha"})
    return uri, exp, client, parent


def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = driver.default_tracking_uri("runs/sweep")
    assert uri == f"sqlite:////{(tmp_path / 'runs/sweep/mlflow.db').as_posix().lstrip('/')}"
    assert uri.startswith("sqlite:////")
    assert driver.default_tracking_uri(Path("/abs/dir")) == "sqlite:////abs/dir/mlflow.db"
    assert driver.DEFAULT_DB == "mlflow.db"


def test_experiment_created_once_with_local_artifact_root(store, tmp_path):
    uri, exp, client = store
    assert driver.ensure_experiment(uri, "plora-test") == exp
    location = client.get_experiment(exp).artifact_location
    assert location == (tmp_path / "store" / "mlartifacts").as_posix()
    assert (tmp_path / "store" / "mlflow.db").is_file()
    other = driver.ensure_experiment(uri, "other", artifact_root=tmp_path / "art")
    assert other != exp
    assert client.get_experiment(other).artifact_location == (tmp_path / "art").as_posix()


def test_sweep_run_tags_and_space_file_artifact(sweep):
    uri, exp, client, parent = sweep
    run = client.get_run(parent)
    tags = run.data.tags
    assert run.info.experiment_id == exp and run.info.run_name == "unload"
    assert tags["plora.sweep"] == "unload" and tags["plora.run_type"] == "sweep"
    assert tags["plora.scheduler"] == "asha"
    commit = tags["mlflow.source.git.commit"]
    repo = Path(driver.__file__).resolve().parent
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
    tags = naming.trial_tags({"plora.momentum": 0.3}, 1)
    a = driver.trial_run(uri, exp, parent, "t_00000", "m0.3 s1", params, tags, {"seed": 1, "lora": {"rank": 8}})
    again = driver.trial_run(uri, exp, parent, "t_00000", "m0.3 s1", params, tags)  # resume
    b = driver.trial_run(uri, exp, parent, "t_00001", "m0.3 s2", params)
    assert a == again and a != b
    run = client.get_run(a)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["plora.trial_id"] == "t_00000"
    assert run.data.tags["plora.seed"] == "1" and run.data.tags["space.plora.momentum"] == "0.3"
    assert run.data.tags["plora.config_id"] == naming.config_id({"plora.momentum": 0.3})
    assert run.info.run_name == "m0.3 s1"
    assert run.data.params == {"lora.rank": "8", "lora.target_modules": '["q_proj", "v_proj"]',
                               "plora.momentum": "0.3", "plora.unload_every_samples": "None",
                               "seed": "1"}
    config = Path(client.download_artifacts(a, "config/run.yaml")).read_text()
    assert "seed: 1" in config and "rank: 8" in config
    # a second sweep with the same trial ids gets its own runs
    parent2 = driver.start_sweep_run(uri, exp, "unload-2", None, {})
    c = driver.trial_run(uri, exp, parent2, "t_00000", "trial_0", params)
    assert c not in (a, b)
    assert [t["run_id"] for t in sweep_trials(uri, parent)] == [a, b]
    assert [t["run_id"] for t in sweep_trials(uri, parent2)] == [c]
    # a finished (or failed) trial that is restarted is set running again, same run
    driver.set_trial_status(uri, a, "failed")
    assert driver.trial_run(uri, exp, parent, "t_00000", "trial_0", params) == a
    run = client.get_run(a)
    assert run.info.status == "RUNNING" and run.data.tags["plora.status"] == "running"


def test_run_names_come_from_searched_values_and_stay_distinct_when_cut():
    assert naming.run_name({"plora.unload_every_samples": 16, "plora.momentum": 0.1, "lora.rank": 1}, 0) == \
        "u16 m0.1 r1 s0"
    assert naming.run_name({"method": "lora", "plora.unload_every_samples": None}, 2) == "lora s2"
    long = [naming.run_name({"optim.lr": 1.234567e-4, "plora.momentum": 0.3, "lora.rank": 8}, 0, f"ab_{i:05d}")
            for i in (3, 11)]
    assert len({n[:naming.RUN_NAME_CHARS] for n in long}) == 2 and long[0].startswith("#3 lr0.000123")
    # repeats of one configuration share a config id; the seed is not part of it
    assert naming.trial_tags({"lora.rank": 8}, 0)["plora.config_id"] == \
        naming.trial_tags({"lora.rank": 8}, 1)["plora.config_id"] != naming.config_id({"lora.rank": 4})


def test_only_the_active_configuration_becomes_params():
    from plora_ray.config.schema import RunConfig

    smol = RunConfig(method="lora", model={"name_or_path": "some/model"}, output_dir="x").model_dump(mode="json")
    params = naming.flatten_params(naming.active_params(smol))
    assert not [k for k in params if k.startswith(("model.tiny", "plora.", "eval.", "distributed.zero"))]
    assert "output_dir" not in params and "name" not in params
    assert params["lora.rank"] == "8" and params["model.name_or_path"] == "some/model"
    tiny = RunConfig(plora={"unload_every_steps": 2}, eval={"tasks": ["arc_easy"]}).model_dump(mode="json")
    params = naming.flatten_params(naming.active_params(tiny))
    assert params["model.tiny.hidden_size"] == "64" and params["plora.unload_every_steps"] == "2"
    assert params["eval.tasks"] == '["arc_easy"]' and "plora.prune_ratio" not in params


def test_run_yaml_names_the_trial_output_and_only_the_sections_that_apply(sweep):
    from plora_ray.config.schema import RunConfig

    uri, exp, client, parent = sweep
    cfg = RunConfig(method="lora", model={"name_or_path": "some/model"}).model_dump(mode="json")
    assert cfg["output_dir"] == "runs/plora-run" and "tiny" in cfg["model"]  # the defaults
    logged = naming.logged_config(cfg, "/sweeps/trials/unload-1-a_00000")
    run_id = driver.trial_run(uri, exp, parent, "a_00000", "lora s0", {}, None, logged)
    text = Path(client.download_artifacts(run_id, "config/run.yaml")).read_text()
    import yaml

    back = yaml.safe_load(text)
    assert back["output_dir"] == "/sweeps/trials/unload-1-a_00000" and "runs/plora-run" not in text
    assert "tiny" not in back["model"] and "plora" not in back and back["lora"]["rank"] == 8
    assert RunConfig.model_validate(back).model.name_or_path == "some/model"  # it loads back
    tiny = naming.logged_config(RunConfig(plora={"unload_every_steps": 2}).model_dump(mode="json"), "out")
    assert tiny["model"]["tiny"]["hidden_size"] == 64 and tiny["plora"]["unload_every_steps"] == 2


def test_params_flattening_limits_and_relogging(sweep):
    uri, exp, client, parent = sweep
    flat = naming.flatten_params({"a": {"b": {"c": 1}}, "e": {}, "flag": True,
                                    "weird key[0]": 2, "long": "x" * 7000})
    assert flat["a.b.c"] == "1" and flat["e"] == "{}" and flat["flag"] == "True"
    assert flat["weird key_0_"] == "2"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("[truncated]")
    many = {f"group{i}": {f"k{j}": j for j in range(30)} for i in range(5)}  # 150 > 100 per batch
    run_id = driver.trial_run(uri, exp, parent, "big", "big", many)
    assert len(client.get_run(run_id).data.params) == 150
    # same params again, plus a changed value (kept as first logged), plus a new key: no error
    many["group0"]["k0"] = 99
    many["extra"] = "new"
    assert driver.trial_run(uri, exp, parent, "big", "big", many) == run_id
    params = client.get_run(run_id).data.params
    assert len(params) == 151 and params["group0.k0"] == "0" and params["extra"] == "new"


def test_sanitize_key():
    assert naming.sanitize_key("eval/mmlu/social_sciences") == "eval/mmlu/social_sciences"
    assert naming.sanitize_key("train/loss") == "train/loss"
    assert naming.sanitize_key("a:b c-d.e") == "a:b c-d.e"
    assert naming.sanitize_key("layers[0].q_proj@x") == "layers_0_.q_proj_x"
    assert naming.sanitize_key("/a//b/") == "a/b"
    assert naming.sanitize_key("a/../b") == "a/__/b"
    assert naming.sanitize_key("ünïcode") == "_n_code"
    long = naming.sanitize_key("x" * 400)
    assert len(long) == 250 and long != naming.sanitize_key("x" * 401)


def test_metrics_at_steps_and_unload_rank_tables(sweep):
    uri, exp, client, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, "m", "m", {})
    logger = worker.RunLogger(uri, run_id)
    for step in range(1, 21):
        logger.log_metrics({"train/loss": 3.0 / step, "train/lr": 1e-4, "train/samples": 24 * step,
                            "train/tokens_per_s": 300.0, "skip": None}, step)
        if step % 10 == 0:
            layers = {f"base_model.model.layers.{i}.self_attn.q_proj": step // 10 * 4 + i for i in range(3)}
            logger.log_unload(stage=step // 10, step=step, samples=24 * step, ranks=layers, seconds=0.01,
                              output_change=0.0 if step == 10 else None)
    logger.log_metrics({"eval/gsm8k/strict": 0.1, "eval/mmlu/social_sciences": 0.3}, 20)
    logger.flush()

    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, 21))
    assert [m.value for m in loss] == pytest.approx([3.0 / s for s in range(1, 21)])
    stage = client.get_metric_history(run_id, "plora/stage")
    assert [(m.step, m.value) for m in stage] == [(10, 1.0), (20, 2.0)]
    for key, values in (("", [5.0, 9.0]), ("_min", [4.0, 8.0]), ("_max", [6.0, 10.0])):
        history = client.get_metric_history(run_id, f"plora/accumulated_rank{key}")
        assert [(m.step, m.value) for m in history] == [(10, values[0]), (20, values[1])]
    change = client.get_metric_history(run_id, "plora/output_change")
    assert [(m.step, m.value) for m in change] == [(10, 0.0)]
    metrics = client.get_run(run_id).data.metrics
    assert not [k for k in metrics if k.startswith("plora/accumulated_rank/")]  # no per-layer keys
    assert metrics["eval/mmlu/social_sciences"] == 0.3 and "skip" not in metrics
    assert [a.path for a in client.list_artifacts(run_id, "ranks")] == ["ranks/unload_0001.json",
                                                                       "ranks/unload_0002.json"]
    table = json.loads(Path(client.download_artifacts(run_id, "ranks/unload_0002.json")).read_text())
    assert table == {"stage": 2, "step": 20, "samples": 480,
                     "ranks": {f"base_model.model.layers.{i}.self_attn.q_proj": 8 + i for i in range(3)}}


def test_trial_tracker_logs_time_params_and_items_on_rank_0_only(sweep):
    uri, exp, client, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, "tt", "tt", {})
    record = driver.TrialRecord(uri, run_id)
    assert pickle.loads(pickle.dumps(record)) == record  # it travels to Ray workers pickled
    assert worker.TrialTracker(record, rank=1).logger is None
    tracker = worker.TrialTracker(record, rank=0)
    tracker.trainable_params(1234)
    for step in (1, 2):
        tracker.step({"step": step, "loss": 1.0, "lr": 1e-3, "samples": 4 * step, "tokens_per_s": 10.0})
    tasks = {"arc_easy": {"ids": ["a", "b"], "acc": [1, 0], "acc_norm": [1, 1]}}
    tracker.items(2, 8, tasks)
    tracker.metrics({"eval/arc_easy/acc": 0.5, "eval/arc_easy/acc_stderr": 0.5}, 2, samples=8)
    tracker.metrics({}, 3, samples=12)  # a checkpoint that scored nothing: no eval/samples
    tracker.phases({"steps": 3.5, "evaluation": 1.25}, 3)
    tracker.flush()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/samples")] == [(2, 8)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "phase/steps_s")] == [(3, 3.5)]
    assert client.get_run(run_id).data.metrics["phase/evaluation_s"] == 1.25
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "model/trainable_params")] == [(0, 1234)]
    elapsed = [m.value for m in client.get_metric_history(run_id, "time/elapsed_s")]
    assert len(elapsed) == 2 and 0 <= elapsed[0] <= elapsed[1]
    items = json.loads(Path(client.download_artifacts(run_id, "items/step_0000002.json")).read_text())
    assert items == {"step": 2, "samples": 8, "tasks": tasks}
    # a restarted worker group continues the clock instead of starting it at 0 again
    again = worker.TrialTracker(driver.TrialRecord(uri, run_id), rank=0)
    again.step({"step": 3, "loss": 1.0, "lr": 1e-3, "samples": 12, "tokens_per_s": 10.0})
    again.flush()
    assert client.get_metric_history(run_id, "time/elapsed_s")[-1].value >= elapsed[-1]


def test_resumed_logger_skips_steps_already_logged(sweep):
    uri, exp, client, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, "r", "r", {})
    with worker.RunLogger(uri, run_id) as first:
        for step in range(1, 8):   # the worker dies after step 7; checkpoint was at step 5
            first.log_metrics({"train/loss": float(step)}, step)
        first.log_metrics({"train/loss": float("nan")}, 8)
    # resumed from the step-5 checkpoint: steps 6..8 are re-run
    assert driver.trial_run(uri, exp, parent, "r", "r", {}) == run_id
    with worker.RunLogger(uri, run_id) as second:
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
    run_id = driver.trial_run(uri, exp, parent, status, status, {})
    driver.set_trial_status(uri, run_id, status)
    run = client.get_run(run_id)
    assert run.info.status == mlflow_status and run.info.end_time is not None
    assert run.data.tags["plora.status"] == status
    trials = sweep_trials(uri, parent)
    assert [(t["trial_id"], t["status"], t["mlflow_status"]) for t in trials] == [
        (status, status, mlflow_status)]


def test_unknown_status_is_refused(sweep):
    uri, exp, client, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, "x", "x", {})
    with pytest.raises(ValueError, match="unknown trial status 'done'"):
        driver.set_trial_status(uri, run_id, "done")


def test_running_trials_are_ended_by_the_driver(sweep):
    uri, exp, client, parent = sweep
    ids = {t: driver.trial_run(uri, exp, parent, t, t, {}) for t in ("done", "asha", "lost")}
    driver.set_trial_status(uri, ids["done"], "finished")
    ended = driver.end_running_trials(uri, parent, {"asha": "stopped_early"})
    assert ended == {"asha": "stopped_early", "lost": "failed"}
    status = {t["trial_id"]: (t["status"], t["mlflow_status"]) for t in sweep_trials(uri, parent)}
    assert status == {"done": ("finished", "FINISHED"), "asha": ("stopped_early", "KILLED"),
                      "lost": ("failed", "FAILED")}
    driver.finish_sweep(uri, parent, {"plora.best_config_id": "abc"})
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["plora.best_config_id"] == "abc"


def test_two_stores_in_one_process(tmp_path, empty_db):
    uris = [new_store(empty_db, tmp_path / name) for name in ("a", "b")]
    exps = [driver.ensure_experiment(uri, "same-name") for uri in uris]
    parents = [driver.start_sweep_run(uri, e, "s", None, {}) for uri, e in zip(uris, exps)]
    for uri, e, p in zip(uris, exps, parents):
        driver.trial_run(uri, e, p, "only", "only", {"x": 1})
    for uri, p in zip(uris, parents):
        assert [t["trial_id"] for t in sweep_trials(uri, p)] == ["only"]
    assert mlflow.get_tracking_uri() not in uris  # no global state touched


def test_mlflow_ui_command(tmp_path):
    uri = driver.default_tracking_uri(tmp_path)
    assert driver.mlflow_ui_command(uri) == f"mlflow ui --backend-store-uri {uri} --port 5000"
    spaced = driver.default_tracking_uri(tmp_path / "with space")
    assert driver.mlflow_ui_command(spaced, port=5001) == (
        f"mlflow ui --backend-store-uri '{spaced}' --port 5001")


def test_trial_tracker_logs_an_unload_once_its_background_ranks_are_measured(sweep):
    """The rank is measured off the unload: the unload is logged, at its own step, by the
    first step after its ranks are there, or at the next checkpoint/flush (waiting)."""
    from concurrent.futures import Future

    from plora_ray.core.unloader import UnloadEvent

    uri, exp, client, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, "late", "late", {})
    tracker = worker.TrialTracker(driver.TrialRecord(uri, run_id), rank=0)
    first, second = Future(), Future()
    tracker.unload(UnloadEvent(1, 2, 8, 0.01, pending=first))
    tracker.step({"step": 3, "loss": 1.0, "lr": 1e-3, "samples": 12, "tokens_per_s": 1.0})
    first.set_result({"q": 8, "v": 6})
    tracker.unload(UnloadEvent(2, 4, 16, 0.01, pending=second))
    tracker.step({"step": 5, "loss": 1.0, "lr": 1e-3, "samples": 20, "tokens_per_s": 1.0})
    tracker.logger.flush()
    ranks = client.get_metric_history(run_id, "plora/accumulated_rank")
    assert [(m.step, m.value) for m in ranks] == [(2, 7.0)]  # the second is still pending
    second.set_result({"q": 16, "v": 12})
    tracker.flush()
    ranks = client.get_metric_history(run_id, "plora/accumulated_rank")
    assert sorted((m.step, m.value) for m in ranks) == [(2, 7.0), (4, 14.0)]
