"""The sweep's closing table (plora_ray/summary.py) on a real SQLite MLflow store with synthetic
trials whose differences are known: per-item artifacts for the paired bootstrap, seeds for the
across-seed interval."""

import json
import shutil
from pathlib import Path

import pytest

from analysis import summary
from plora_ray.tracking import driver, naming, worker

mlflow = pytest.importorskip("mlflow")
N_ITEMS = 200


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """A migrated MLflow database to copy (creating one takes seconds, copying milliseconds)."""
    uri = driver.default_tracking_uri(tmp_path_factory.mktemp("template"))
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return Path(uri.removeprefix("sqlite:///"))


@pytest.fixture
def sweep(tmp_path, empty_db):
    shutil.copyfile(empty_db, tmp_path / driver.DEFAULT_DB)
    uri = driver.default_tracking_uri(tmp_path)
    exp = driver.ensure_experiment(uri, "summary-test")
    return uri, exp, driver.start_sweep_run(uri, exp, "s", None, {})


def add_trial(sweep, trial_id, values, seed, metrics, tasks=None, status="finished"):
    uri, exp, parent = sweep
    run_id = driver.trial_run(uri, exp, parent, trial_id, naming.run_name(values, seed), {},
                                naming.trial_tags(values, seed))
    with worker.RunLogger(uri, run_id) as logger:
        logger.log_metrics(metrics, 10)
        if tasks:
            logger.log_items(10, 80, tasks)
    driver.set_trial_status(uri, run_id, status)
    return run_id


def arc(correct):
    """An ARC-Easy items record where the listed item numbers are answered correctly."""
    acc = [1 if i in correct else 0 for i in range(N_ITEMS)]
    return {"arc_easy": {"ids": [f"q{i}" for i in range(N_ITEMS)], "acc": acc, "acc_norm": acc}}


def arc_metrics(correct):
    p = len(correct) / N_ITEMS
    return {"eval/arc_easy/acc_norm": p, "eval/arc_easy/acc_norm_stderr": (p * (1 - p) / (N_ITEMS - 1)) ** 0.5}


def by_label(result):
    return {c["label"]: c for c in result["configs"]}


def test_paired_items_mark_close_configurations_indistinguishable_and_far_ones_not(sweep):
    # 75 %, 73 % (right on 6 items the best misses, wrong on 10 it gets), 30 %
    best, close, far = set(range(150)), set(range(140)) | set(range(150, 156)), set(range(60))
    add_trial(sweep, "t0", {"plora.momentum": 0.0}, 0, arc_metrics(close), arc(close))
    add_trial(sweep, "t1", {"plora.momentum": 0.1}, 0, arc_metrics(best), arc(best))
    add_trial(sweep, "t2", {"plora.momentum": 0.5}, 0, arc_metrics(far), arc(far))
    add_trial(sweep, "t3", {"plora.momentum": 0.9}, 0, {"train/loss": 9.0}, status="diverged")
    uri, _, parent = sweep
    result = summary.sweep_summary(uri, parent, "eval/arc_easy/acc_norm", "max")
    rows = by_label(result)
    assert [c["label"] for c in result["configs"]] == ["m0.1", "m0", "m0.5", "m0.9"]  # best first
    assert rows["m0.1"]["verdict"] == "best" and result["best_config_id"] == rows["m0.1"]["config_id"]
    assert rows["m0.1"]["value"] == pytest.approx(0.75)
    assert rows["m0.1"]["lo"] < 0.75 < rows["m0.1"]["hi"]  # Wilson's, over the 200 items
    assert rows["m0.1"]["interval"] == f"Wilson over {N_ITEMS} items"
    assert rows["m0"]["verdict"] == "indistinguishable"
    assert rows["m0"]["diff"] == pytest.approx(-0.02) and rows["m0"]["diff_lo"] < 0 <= rows["m0"]["diff_hi"]
    assert rows["m0.5"]["verdict"] == "distinguishable" and rows["m0.5"]["diff_hi"] < 0
    assert rows["m0.5"]["diff_method"] == f"paired bootstrap over {N_ITEMS} items"
    assert rows["m0.9"]["verdict"] == "no result" and rows["m0.9"]["trials"][0]["status"] == "diverged"
    assert result["winner"] and result["sentence"] == (
        "Best: m0.1 (eval/arc_easy/acc_norm 0.75); indistinguishable from it at 95%: m0.")


def test_no_distinguishable_configuration_is_said_in_one_sentence(sweep):
    a, b = set(range(100)), set(range(1, 101))  # the same accuracy on different items
    add_trial(sweep, "t0", {"lora.rank": 1}, 0, arc_metrics(a), arc(a))
    add_trial(sweep, "t1", {"lora.rank": 8}, 0, arc_metrics(b | {150}), arc(b | {150}))
    uri, _, parent = sweep
    result = summary.sweep_summary(uri, parent, "eval/arc_easy/acc_norm", "max")
    assert not result["winner"]
    assert result["sentence"] == ("No configuration is distinguishable from the best at the 95% level "
                                  "(every difference interval includes 0): this sweep names no winner.")
    assert [c["verdict"] for c in result["configs"]] == ["reference", "indistinguishable"]
    text = summary.format_summary(result)
    assert text.splitlines()[-1] == result["sentence"] and "| best |" not in text


def test_accuracy_intervals_on_few_items_stay_inside_0_1_and_the_summary_says_they_are_too_few(sweep):
    from scipy.stats import binomtest

    def few(correct, n=4):
        acc = [1 if i in correct else 0 for i in range(n)]
        p = len(correct) / n
        return ({"eval/mmlu/acc": p, "eval/mmlu/acc_stderr": (p * (1 - p) / (n - 1)) ** 0.5},
                {"mmlu": {"ids": [f"m{i}" for i in range(n)], "acc": acc, "category": ["stem"] * n}})

    add_trial(sweep, "t0", {"lora.rank": 1}, 0, *few({0}))     # 1 of 4: 0.25 ± 1.96·0.25 leaves [0, 1]
    add_trial(sweep, "t1", {"lora.rank": 8}, 0, *few(set()))   # 0 of 4: stderr 0, yet not certain
    for seed, correct in enumerate([{0, 1, 2, 3}, {0, 1, 2}]):  # 2 seeds near 1: t interval clipped
        add_trial(sweep, f"s{seed}", {"lora.rank": 4}, seed, *few(correct))
    uri, _, parent = sweep
    result = summary.sweep_summary(uri, parent, "eval/mmlu/acc", "max")
    rows = by_label(result)
    one = binomtest(1, 4).proportion_ci(method="wilson")  # scipy's Wilson score interval
    assert (rows["r1"]["lo"], rows["r1"]["hi"]) == pytest.approx((one.low, one.high))
    none = binomtest(0, 4).proportion_ci(method="wilson")
    assert rows["r8"]["lo"] == 0 and rows["r8"]["hi"] == pytest.approx(none.high) and none.high > 0.4
    assert rows["r1"]["interval"] == "Wilson over 4 items" and rows["r4"]["interval"] == "across seeds"
    assert rows["r4"]["hi"] == 1.0 and 0 <= rows["r4"]["lo"] < 0.875
    assert all(0 <= c["lo"] <= c["value"] <= c["hi"] <= 1 for c in result["configs"])
    text = summary.format_summary(result)
    assert "0.25 | [0.04559, 0.6994]" in text
    assert "eval/mmlu/acc is a mean over only 4 item(s) here: too few" in text


def test_repeats_are_aggregated_across_seeds(sweep):
    for seed, (x, y) in enumerate([(1.00, 1.30), (1.02, 1.31), (0.98, 1.29)]):
        add_trial(sweep, f"a{seed}", {"optim.lr": 0.001}, seed, {"train/loss": x})
        add_trial(sweep, f"b{seed}", {"optim.lr": 0.01}, seed, {"train/loss": y})
    uri, _, parent = sweep
    result = summary.sweep_summary(uri, parent, "train/loss", "min")
    rows = by_label(result)
    assert len(result["configs"]) == 2 and rows["lr0.001"]["seeds"] == 3
    assert sorted(t["seed"] for t in rows["lr0.001"]["trials"]) == ["0", "1", "2"]
    assert rows["lr0.001"]["value"] == pytest.approx(1.0) and rows["lr0.001"]["interval"] == "across seeds"
    assert rows["lr0.001"]["lo"] < 1.0 < rows["lr0.001"]["hi"] < 1.1
    assert rows["lr0.01"]["diff"] == pytest.approx(0.3) and rows["lr0.01"]["verdict"] == "distinguishable"
    assert rows["lr0.01"]["diff_method"] == "Welch t across seeds (3 vs 3)"


def test_summary_is_stored_on_the_sweep_run(sweep):
    add_trial(sweep, "t0", {"lora.rank": 1}, 0, {"train/loss": 1.0})
    uri, _, parent = sweep
    text = summary.log_summary(uri, parent, summary.sweep_summary(uri, parent, "train/loss", "min"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert sorted(a.path for a in client.list_artifacts(parent, "summary")) == [
        "summary/summary.json", "summary/summary.md"]
    assert text in Path(client.download_artifacts(parent, "summary/summary.md")).read_text()
    stored = json.loads(Path(client.download_artifacts(parent, "summary/summary.json")).read_text())
    assert stored["configs"][0]["label"] == "r1" and stored["configs"][0]["lo"] is None  # no stderr: no interval
    assert "nothing to compare" in stored["sentence"]
