"""Any lm-evaluation-harness task by name (``eval.harness``): a custom lm-eval task over a local
JSONL, scored by lm-eval on the live model at every checkpoint of a 2-worker Ray run, equals
``lm_eval.simple_evaluate`` on the saved model; a sweep optimises its metric; an unknown task
name stops the run before Ray starts."""

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from plora_ray.config.names import direction, harness_metric_task  # noqa: E402
from plora_ray.evaluation.harness import flatten_results, items_from_samples, metric_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "plora_tiny_mc"
ITEMS = [
    {"question": "Which is a mammal?", "choices": ["dog", "trout", "eagle", "ant"], "gold": 0},
    {"question": "Water boils at?", "choices": ["100 C", "0 C", "50 C"], "gold": 0},
    {"question": "Plants make food by?", "choices": ["photosynthesis", "eating", "digging"], "gold": 0},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "gold": 1},
    {"question": "The sky is", "choices": ["green", "blue", "red"], "gold": 1},
    {"question": "Ice is", "choices": ["hot", "warm", "cold"], "gold": 2},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with one lm-eval task YAML over a local JSONL (lm-eval's include_path)."""
    tmp = tmp_path_factory.mktemp("harness")
    data = tmp / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp / "hf")},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    return tasks


def run_yaml(tmp_path, task_dir, **top):
    cfg = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())
    cfg["data"].update({"max_steps": 4, "max_length": 64, "micro_batch_size": 4,
                        "gradient_accumulation_steps": 1})
    cfg.update({"plora": {"unload_every_steps": 2, "momentum": 0.1}, "checkpoint_every_steps": 2,
                "log_every_steps": 100,
                "eval": {"harness": {"tasks": [TASK], "include_path": str(task_dir), "batch_size": 4}}})
    cfg.update(top)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------ names, without a model

def test_lm_eval_keys_become_project_names():
    assert metric_name("acc,none") == "acc" and metric_name("acc_stderr,none") == "acc_stderr"
    assert metric_name("exact_match,strict-match") == "exact_match_strict-match"
    assert metric_name("exact_match_stderr,strict-match") == "exact_match_strict-match_stderr"
    flat = flatten_results({"t": {"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": "N/A",
                                  "word_perplexity,none": 9.0}})
    assert flat == {"eval/t/acc": 0.5, "eval/t/word_perplexity": 9.0}
    items = items_from_samples({"t": [
        {"doc_id": 1, "filter": "none", "metrics": ["acc"], "acc": 0.0},
        {"doc_id": 0, "filter": "none", "metrics": ["acc"], "acc": 1.0}]})
    assert items == {"t": {"ids": ["t-0", "t-1"], "acc": [1.0, 0.0]}}


def test_sweep_metric_direction_and_task():
    assert harness_metric_task("eval/hellaswag/acc_norm") == "hellaswag"
    assert harness_metric_task("eval/mmlu/acc") is None and harness_metric_task("train/loss") is None
    assert direction("eval/hellaswag/acc_norm") == "max"
    assert [direction(f"eval/wikitext/{m}") for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")] \
        == ["min"] * 3
    assert direction("eval/heldout/loss") == "min"


def test_unknown_harness_task_is_one_line_exit_2_before_ray(tmp_path, task_dir, capsys, monkeypatch):
    import plora_ray.cli.train as cli

    def no_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "run_ray", no_run)
    monkeypatch.setattr(cli, "run_local", no_run)
    path = run_yaml(tmp_path, task_dir)
    code = cli.main([str(path), "--workers", "2", "--output", str(tmp_path / "out"),
                     "--set", f"eval.harness.tasks=[{TASK}, hellaswagg]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "eval.harness.tasks" in err[0] and "hellaswagg" in err[0] and "did you mean 'hellaswag'" in err[0]
    assert not (tmp_path / "out").exists()


def test_sweep_metric_of_an_unscored_harness_task_is_refused(tmp_path, task_dir):
    from plora_ray.config.schema import ConfigError
    from plora_ray.config.sweep import load_sweep

    base = yaml.safe_load(run_yaml(tmp_path, task_dir).read_text())
    # the sweep trains on a prompt/completion file of its own through a column map, packed
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": f"It is {2 * i}."}) + "\n" for i in range(40)))
    base["data"].pop("train_files", None)
    base["data"].update({"sources": [{"path": str(qa), "columns": {"prompt": "q", "completion": "a"}}],
                         "packing": True})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"metric": "eval/other_task/acc", "base": base,
                                     "space": {"optim.lr": {"choice": [1e-3]}}}))
    with pytest.raises(ConfigError, match="never measured: add other_task to the base's eval.harness.tasks"):
        load_sweep(space)
    base["eval"]["harness"]["at"] = "last"  # checkpoints every 2 steps: Tune would miss the metric
    space.write_text(yaml.safe_dump({"metric": f"eval/{TASK}/acc", "base": base,
                                     "space": {"optim.lr": {"choice": [1e-3]}}}))
    with pytest.raises(ConfigError, match="set eval.harness.at: every"):
        load_sweep(space)


def test_scoring_leaves_training_as_it_was(tiny_cfg, task_dir):
    """Same losses with and without the harness (lm-eval seeds the global RNGs; dropout draws
    from them), and the model back in train mode."""
    from plora_ray.run.loop import fit, setup

    def losses(tasks, at="every"):
        cfg = tiny_cfg(method="lora", checkpoint_every_steps=1, lora={"dropout": 0.1},
                       data={"max_steps": 3},
                       eval={"harness": {"tasks": tasks, "include_path": str(task_dir), "limit": 2, "at": at}})
        run = fit(setup(cfg), progress=False)
        assert run.model.training
        return run, [h["loss"] for h in run.history]

    keys = sorted(["step", *(f"eval/{TASK}/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"))])
    every, with_harness = losses([TASK])
    assert [sorted(e) for e in every.evals] == [keys] * 3
    assert every.items[TASK]["ids"] == [f"{TASK}-0", f"{TASK}-1"]
    last, at_last = losses([TASK], "last")
    assert [e["step"] for e in last.evals] == [3] and sorted(last.evals[0]) == keys
    assert with_harness == at_last == losses([])[1]


# ------------------------------------------------------------------ a 2-worker run, a sweep

@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def test_harness_task_scored_at_every_checkpoint_of_a_2_worker_run_equals_lm_eval(tmp_path, task_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from plora_ray.cli.train import main

    out = tmp_path / "out"
    assert main([str(run_yaml(tmp_path, task_dir)), "--workers", "2", "--output", str(out)]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert {f"eval/{TASK}/acc", f"eval/{TASK}/acc_stderr", f"eval/{TASK}/acc_norm",
                f"eval/{TASK}/acc_norm_stderr"} <= set(e)
    lm = HFLM(pretrained=str(out / "merged"), device="cpu", batch_size=4)
    ref = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)))
    expected = flatten_results(ref["results"])
    assert expected.keys() == {k for k in evals[-1] if k.startswith("eval/")}
    for key, value in expected.items():
        assert evals[-1][key] == pytest.approx(value, abs=1e-6), key
    # the evaluate CLI scores the same task on the saved model, through the same lm-eval call
    from plora_ray.cli.evaluate import main as evaluate

    scores = tmp_path / "scores.json"
    assert evaluate([str(out / "merged"), "--tasks", "", "--harness", TASK, "--include-path", str(task_dir),
                     "--batch-size", "4", "--output", str(scores)]) == 0
    written = json.loads(scores.read_text())
    for key, value in expected.items():
        assert written["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert len(written["samples"][f"harness/{TASK}"]["ids"]) == len(ITEMS)


def test_evaluate_cli_refuses_an_unknown_harness_task_before_loading(tmp_path, task_dir, capsys):
    from plora_ray.cli.evaluate import main as evaluate

    assert evaluate(["/nonexistent-but-unread", "--tasks", "", "--harness", "plora_tiny_mcq",
                     "--include-path", str(task_dir)]) == 2
    assert capsys.readouterr().err.startswith("error: model path not found")
    assert evaluate(["tiny", "--tasks", "", "--harness", "plora_tiny_mcq", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plora_tiny_mcq" in err and TASK in err  # did you mean
    assert evaluate(["tiny", "--tasks", "", "--harness", TASK, "--include-path", str(tmp_path / "no")]) == 2
    assert "--include-path" in capsys.readouterr().err


def test_a_sweep_optimises_a_harness_metric(tmp_path, task_dir, capsys):
    from mlflow import MlflowClient

    from analysis.store import sweep_trials
    from plora_ray.cli.tune import main
    from plora_ray.tracking.driver import default_tracking_uri

    base = yaml.safe_load(run_yaml(tmp_path, task_dir).read_text())
    # the sweep trains on a prompt/completion file of its own through a column map, packed
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": f"It is {2 * i}."}) + "\n" for i in range(40)))
    base["data"].pop("train_files", None)
    base["data"].update({"sources": [{"path": str(qa), "columns": {"prompt": "q", "completion": "a"}}],
                         "packing": True})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "h", "metric": f"eval/{TASK}/acc_norm", "searcher": {"type": "grid"},
        "resources": {"workers": 1, "cpus_per_worker": 1}, "base": base,
        "space": {"optim.lr": {"grid": [1e-3]}}}))
    assert main([str(space), "--storage", str(tmp_path / "sweeps"), "--no-report"]) == 0
    assert f"max eval/{TASK}/acc_norm" in capsys.readouterr().out
    uri = default_tracking_uri(tmp_path / "sweeps")
    sweep = json.loads((tmp_path / "sweeps" / "h.latest.json").read_text())
    (trial,) = sweep_trials(uri, sweep["parent_run_id"])
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(trial["run_id"], f"eval/{TASK}/acc_norm")
    assert [m.step for m in history] == [2, 4]
    local = client.download_artifacts(trial["run_id"], "items/step_0000004.json", str(tmp_path))
    items = json.loads(Path(local).read_text())
    record = items["tasks"][TASK]
    assert record["ids"] == [f"{TASK}-{i}" for i in range(len(ITEMS))]
    assert sum(record["acc_norm"]) / len(ITEMS) == pytest.approx(history[-1].value)
