"""analysis.stats: intervals that match lm-eval and detect (only) real differences."""

import math

import numpy as np
import pytest
from lm_eval.api.metrics import mean_stderr as lm_mean_stderr

from analysis import stats


def test_mean_stderr_equals_lm_eval():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2, size=57).astype(float).tolist()
    mean, se = stats.mean_stderr(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(lm_mean_stderr(values), rel=1e-12)


def test_normal_interval_is_mean_plus_minus_1_96_stderr():
    lo, hi = stats.normal_interval(0.5, 0.1)
    assert lo == pytest.approx(0.5 - 0.195996, abs=1e-5)
    assert hi == pytest.approx(0.5 + 0.195996, abs=1e-5)


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 1.0, size=400)  # shared per-item difficulty: pairing removes it
    a = base + 0.3 + rng.normal(0, 0.1, size=400)
    b = base + rng.normal(0, 0.1, size=400)
    res = stats.paired_bootstrap(a, b, seed=0)
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert res["lo"] < 0.3 < res["hi"]
    assert stats.distinguishable(res["lo"], res["hi"])


def test_paired_bootstrap_reports_null_difference_indistinguishable():
    rng = np.random.default_rng(2)
    base = rng.normal(2.0, 1.0, size=300)
    a = base + rng.normal(0, 0.2, size=300)
    b = base + rng.normal(0, 0.2, size=300)
    res = stats.paired_bootstrap(a, b, seed=0)
    assert res["lo"] < 0 < res["hi"]
    assert not stats.distinguishable(res["lo"], res["hi"])


def test_paired_bootstrap_weights_give_token_weighted_means():
    a, b, w = [1.0, 3.0], [2.0, 2.0], [3, 1]
    res = stats.paired_bootstrap(a, b, weights=w, n_boot=50)
    assert res["diff"] == pytest.approx((1 * 3 + 3 * 1) / 4 - 2.0)


def test_seed_difference_is_welch_interval():
    from scipy import stats as sst
    xs, ys = [1.0, 1.2, 0.9, 1.1], [0.5, 0.7, 0.6]
    res = stats.seed_difference(xs, ys)
    ref = sst.ttest_ind(xs, ys, equal_var=False).confidence_interval(0.95)
    assert res["diff"] == pytest.approx(np.mean(xs) - np.mean(ys))
    assert (res["lo"], res["hi"]) == pytest.approx((ref.low, ref.high))


def test_seed_difference_with_one_seed_is_unknown_not_distinguishable():
    res = stats.seed_difference([1.0], [0.0, 0.1])
    assert math.isnan(res["lo"]) and not stats.distinguishable(res["lo"], res["hi"])


def test_t_quantile_fallback_matches_scipy(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert stats.t_quantile(0.975, 4.0) == pytest.approx(2.776445, abs=1e-4)


# ============================================================================ the report

import json

from mlflow import MlflowClient
from mlflow.entities import Metric

from analysis.__main__ import main as cli
from analysis.figures import DPI, FIGSIZE, smooth
from analysis.report import write_report

N_ITEMS = 40
CHECKPOINTS = (10, 20, 30, 40)
SAMPLES_PER_STEP = 8
ORDER = np.random.default_rng(7).permutation(N_ITEMS)  # items a run gets right, best first
TOKENS = [10 + i % 5 for i in range(N_ITEMS)]
_NOISE = np.array([0.1 * ((i % 3) - 1) for i in range(N_ITEMS)])
NOISE = _NOISE - np.average(_NOISE, weights=TOKENS)  # token-weighted mean 0: task loss = target


def _items(step, correct, heldout):
    acc = np.zeros(N_ITEMS)
    acc[ORDER[:correct]] = 1
    return {"step": step, "samples": step * SAMPLES_PER_STEP, "tasks": {
        "heldout": {"ids": [f"h{i}" for i in range(N_ITEMS)],
                    "loss": (heldout + NOISE).tolist(), "tokens": TOKENS},
        "arc_easy": {"ids": [f"a{i}" for i in range(N_ITEMS)],
                     "acc": acc.tolist(), "acc_norm": acc.tolist()}}}


def log_trial(client, exp_id, parent_id, tmp, *, config, seed, space, acc, heldout,
              status="finished", rank=2, train_steps=40):
    """A trial written as docs/tracking_layout.md says; acc = items correct per checkpoint."""
    tags = {"mlflow.parentRunId": parent_id, "plora.run_type": "trial", "plora.status": status,
            "plora.config_id": config, "plora.seed": str(seed), "space.seed": str(seed),
            **{f"space.{k}": str(v) for k, v in space.items()}}
    run = client.create_run(exp_id, tags=tags, run_name=f"{config} s{seed}")
    rid = run.info.run_id
    client.log_batch(rid, params=[], metrics=[Metric("model/trainable_params", 1000.0 * rank, 0, 0)])
    metrics = []
    for step in range(1, train_steps + 1):
        metrics += [Metric("train/loss", 3.0 - 0.01 * step + 0.5 * (step % 2), 0, step),
                    Metric("train/samples", step * SAMPLES_PER_STEP, 0, step),
                    Metric("time/elapsed_s", 0.5 * step, 0, step)]
    if space.get("method") == "plora":
        for stage, step in enumerate(range(2, train_steps + 1, 2), start=1):
            metrics += [Metric("plora/stage", stage, 0, step),
                        Metric("plora/accumulated_rank", min(stage * rank, 64), 0, step),
                        Metric("plora/accumulated_rank_min", min(stage * rank, 64), 0, step),
                        Metric("plora/accumulated_rank_max", min(stage * rank, 64), 0, step)]
    for step, k, loss in zip(CHECKPOINTS, acc, heldout):
        if step > train_steps:
            break
        items = _items(step, k, loss)
        a = items["tasks"]["arc_easy"]["acc_norm"]
        h = items["tasks"]["heldout"]["loss"]
        metrics += [Metric("eval/arc_easy/acc_norm", float(np.mean(a)), 0, step),
                    Metric("eval/arc_easy/acc_norm_stderr", lm_mean_stderr(a), 0, step),
                    Metric("eval/heldout/loss", float(loss), 0, step),
                    Metric("eval/heldout/loss_stderr", lm_mean_stderr(h), 0, step),
                    Metric("eval/samples", step * SAMPLES_PER_STEP, 0, step)]
        path = tmp / f"step_{step:07d}.json"
        path.write_text(json.dumps(items))
        client.log_artifact(rid, str(path), artifact_path="items")
    for start in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[start:start + 1000])
    if status != "running":
        client.set_terminated(rid, status="FINISHED")
    return rid


LORA = {"method": "lora", "lora.rank": 2, "plora.unload_every_samples": None}
P16 = {"method": "plora", "lora.rank": 2, "plora.unload_every_samples": 16}
P8 = {"method": "plora", "lora.rank": 2, "plora.unload_every_samples": 8}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A finished 'unload' sweep: LoRA and PLoRA/16 with 2 seeds, PLoRA/8 with one."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("unload", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, run_name="unload", tags={
        "plora.run_type": "sweep", "plora.sweep": "unload",
        "plora.metric": "eval/arc_easy/acc_norm", "plora.mode": "max"}).info.run_id
    runs = {}
    for key, config, seed, space, acc, heldout in [
            ("L0", "lora", 0, LORA, [20, 24, 26, 28], [2.0, 1.6, 1.4, 1.3]),
            ("L1", "lora", 1, LORA, [20, 23, 25, 27], [2.01, 1.61, 1.41, 1.31]),
            ("P16_0", "p16", 0, P16, [22, 28, 32, 34], [1.8, 1.35, 1.25, 1.2]),
            ("P16_1", "p16", 1, P16, [22, 29, 33, 33], [1.8, 1.30, 1.25, 1.21]),
            ("P8_0", "p8", 0, P8, [22, 28, 32, 34], [1.9, 1.5, 1.45, 1.4])]:
        tmp = root / key
        tmp.mkdir()
        runs[key] = log_trial(client, exp, parent, tmp, config=config, seed=seed, space=space,
                              acc=acc, heldout=heldout)
    client.set_terminated(parent)
    out = root / "report"
    path = write_report(uri, "unload", out_dir=out)
    return {"uri": uri, "client": client, "parent": parent, "runs": runs, "out": out,
            "path": path, "md": path.read_text(),
            "numbers": json.loads((out / "report.json").read_text())}


@pytest.fixture
def scratch(store):
    """The same store for tests that write their own experiment (a new SQLite store costs a
    schema migration, seconds)."""
    return store["uri"], store["client"]


def _row(numbers, which, unload):
    return next(r for r in numbers["tables"][which]
                if r["config"]["plora.unload_every_samples"] == unload)


def test_table_cell_across_seeds_is_mean_with_t_interval(store):
    from scipy import stats as sst
    cell = _row(store["numbers"], "best", None)["cells"]["eval/arc_easy/acc_norm"]
    per_seed = [28 / 40, 27 / 40]  # LoRA's best checkpoints: step 40 for both seeds
    half = sst.t.ppf(0.975, 1) * np.std(per_seed, ddof=1) / np.sqrt(2)
    assert cell["value"] == pytest.approx(np.mean(per_seed))
    assert (cell["lo"], cell["hi"]) == pytest.approx((np.mean(per_seed) - half,
                                                      np.mean(per_seed) + half))
    assert cell["n_seeds"] == 2


def test_table_cell_of_one_seed_is_wilsons_interval_for_an_accuracy_else_the_logged_stderr(store):
    from scipy.stats import binomtest
    cell = _row(store["numbers"], "best", 8)["cells"]["eval/arc_easy/acc_norm"]
    wilson = binomtest(34, 40).proportion_ci(method="wilson")  # a mean of 0/1 items
    assert cell["value"] == pytest.approx(34 / 40)
    assert (cell["lo"], cell["hi"]) == pytest.approx((wilson.low, wilson.high))
    assert cell["best"]
    assert f"**0.850 [{wilson.low:.3f}, {wilson.high:.3f}]**" in store["md"]
    loss = _row(store["numbers"], "best", 8)["cells"]["eval/heldout/loss"]
    se = lm_mean_stderr(_items(40, 34, 1.4)["tasks"]["heldout"]["loss"])
    assert (loss["lo"], loss["hi"]) == pytest.approx((1.4 - 1.959964 * se, 1.4 + 1.959964 * se), abs=1e-5)


def test_best_checkpoint_is_chosen_by_the_sweep_metric(store):
    # PLoRA/16 seed 1 peaks on ARC-Easy at step 30 (33 items), where its held-out loss is 1.25
    cell = _row(store["numbers"], "best", 16)["cells"]["eval/heldout/loss"]
    assert cell["value"] == pytest.approx((1.2 + 1.25) / 2)
    last = _row(store["numbers"], "last", 16)["cells"]["eval/heldout/loss"]
    assert last["value"] == pytest.approx((1.2 + 1.21) / 2)


def test_cells_not_distinguishable_from_the_best_are_marked(store):
    acc = {u: _row(store["numbers"], "best", u)["cells"]["eval/arc_easy/acc_norm"]
           for u in (None, 16, 8)}
    # PLoRA/16 seed 0 got exactly PLoRA/8's items right: paired difference 0
    assert acc[16]["tied"] and acc[16]["test"] == "paired"
    # LoRA misses 6 of the items PLoRA/8 gets right, and gets none it misses
    assert not acc[None]["tied"] and acc[None]["test"] == "paired"
    loss = {u: _row(store["numbers"], "best", u)["cells"]["eval/heldout/loss"]
            for u in (None, 16, 8)}
    assert loss[16]["best"]
    assert loss[None]["tied"] and loss[None]["test"] == "seeds"  # 2 seeds each: Welch, wide
    assert not loss[8]["tied"]  # 0.2 higher on every item


def test_learning_ability_ratios_are_sample_ratios_to_the_lora_best(store):
    rows = {(r["plora"], r["target"]): r for r in store["numbers"]["learning_ability"]}
    p16 = next(k for k in rows if "16" in k[0] and k[1] == "held-out loss")
    held = rows[p16]
    # LoRA's best loss at step 40 (320 samples); PLoRA/16 reaches it at step 30 (seed 0: 240)
    # and step 20 (seed 1: 160)
    assert held["speed_per_seed"] == pytest.approx([320 / 240, 320 / 160])
    assert held["speed"][0] == pytest.approx(np.mean([320 / 240, 2.0]))
    assert held["quality_per_seed"] == pytest.approx([1.2 / 1.3, 1.21 / 1.31])
    bench = rows[(p16[0], "benchmark")]
    assert bench["speed_per_seed"] == pytest.approx([2.0, 2.0])


def test_learning_ability_needs_a_benchmark_curve_not_a_final_score(scratch, tmp_path):
    """Benchmarks scored only at the last checkpoint (final_only_tasks) have no "samples to
    reach"; MMLU categories are never the target."""
    uri, client = scratch
    exp, parent = heldout_sweep(client, "final-only", tmp_path)
    for space in (LORA, P16):
        rid = client.create_run(exp, tags={"mlflow.parentRunId": parent, "plora.status": "finished",
                                           "plora.seed": "0", "space.seed": "0",
                                           **{f"space.{k}": str(v) for k, v in space.items()}}).info.run_id
        client.log_batch(rid, metrics=[
            Metric("eval/heldout/loss", 2.0, 0, 10), Metric("eval/heldout/loss", 1.5, 0, 20),
            Metric("eval/samples", 80, 0, 10), Metric("eval/samples", 160, 0, 20),
            Metric("eval/mmlu/humanities", 0.3, 0, 20), Metric("eval/mmlu/acc", 0.3, 0, 20)])
    from analysis.learning import learning_ability
    from analysis.store import load_sweep
    assert [a.target for a in learning_ability(load_sweep(uri, "final-only"))] == ["held-out loss"]


def test_plora_minus_lora_is_paired_by_seed_and_by_item(store):
    """P16 vs LoRA, seeds 0 and 1: held-out loss 1.2/1.21 vs 1.3/1.31 at the last checkpoint
    (the same per-item noise on both sides), ARC 34/33 vs 28/27 of 40 items correct."""
    rows = {(d["plora"], d["metric"]): d for d in store["numbers"]["differences"]}
    label = "method=plora plora.unload_every_samples=16"
    loss = rows[(label, "eval/heldout/loss")]
    assert loss["diff"] == pytest.approx(-0.1)
    assert loss["seeds"]["n"] == 2 and loss["items"]["n"] == N_ITEMS
    assert loss["seeds"]["lo"] == pytest.approx(-0.1) and loss["seeds"]["hi"] == pytest.approx(-0.1)
    assert loss["items"]["diff"] == pytest.approx(-0.1) and loss["items"]["hi"] < 0
    assert loss["better"] == "plora"
    arc = rows[(label, "eval/arc_easy/acc_norm")]
    assert arc["diff"] == pytest.approx(6 / 40) and arc["items"]["diff"] == pytest.approx(6 / 40)
    assert arc["items"]["lo"] < arc["items"]["diff"] < arc["items"]["hi"]
    # one seed a side: no seed interval, so never called distinguishable
    p8 = rows[("method=plora plora.unload_every_samples=8", "eval/heldout/loss")]
    assert p8["seeds"]["n"] == 1 and p8["better"] is None
    assert "## PLoRA − LoRA at the last checkpoint, paired" in store["md"]


def test_learning_ability_says_when_the_target_is_never_reached(store):
    p8 = next(r for r in store["numbers"]["learning_ability"]
              if "=8" in r["plora"] and r["target"] == "held-out loss")
    assert p8["speed_per_seed"] == [None] and p8["speed"] is None
    assert "not reached in 1 of 1 seed(s): no number" in store["md"]


def test_figures_are_pngs_of_the_expected_size(store):
    import matplotlib.image as mpimg
    names = store["numbers"]["figures"]
    assert {"train_loss.png", "eval_arc_easy_acc_norm.png", "eval_heldout_loss.png",
            "accumulated_rank.png"} <= set(names)
    for name in names:
        image = mpimg.imread(store["out"] / name)
        assert image.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)
        assert f"]({name})" in store["md"]


def test_train_loss_figure_tells_the_trials_apart_and_marks_their_unloads(store):
    import matplotlib.pyplot as plt
    from analysis.figures import loss_reference, train_loss_plot
    from analysis.store import load_sweep
    sweep = load_sweep(store["uri"], "unload", store["parent"])
    fig = train_loss_plot(sweep, window=1)
    loss, delta, rug = fig.axes
    names = [t.name for t in sweep.trials]
    assert [line.get_label() for line in loss.get_lines()] == names
    looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in loss.get_lines()}
    assert len(looks) == len(names)  # no two trials drawn alike
    ref = loss_reference(sweep.trials)
    assert ref.param("method") == "lora" and ref.name in delta.get_ylabel()
    assert len(delta.get_lines()) == len(names)  # every other trial's difference, and the 0 line
    plora = [t for t in sweep.trials if t.param("method") == "plora"]
    assert [x.get_text() for x in rug.get_yticklabels()] == [t.name for t in plora]
    for ticks in rug.collections:  # one tick per unload (every 2 steps), in training samples
        assert ticks.get_offsets()[:, 0].tolist() == [s * SAMPLES_PER_STEP for s in range(2, 41, 2)]
    plt.close(fig)


def test_report_is_logged_under_report_of_the_sweep_run(store):
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert {"report/report.md", "report/train_loss.png", "report/report.json",
            "report/pareto.png", "report/importance.png"} <= logged
    assert "PARTIAL" not in store["md"]


def test_smoothing_is_a_trailing_moving_average():
    assert smooth([1, 2, 3, 4, 5], 3).tolist() == pytest.approx([1, 1.5, 2, 3, 4])
    assert smooth([1.0, 5.0], 150).tolist() == pytest.approx([1, 3])


def test_pareto_front_keeps_trials_nobody_beats_on_cost_and_metric(store):
    points = {p["trial"]: p for p in store["numbers"]["pareto"]}
    # PLoRA/16 seed 1: 33/40 at step 30 (240 samples); seed 0 and PLoRA/8: 34/40 at 320
    assert points["p16 s1"]["samples"] == 240 and points["p16 s1"]["pareto_samples"]
    assert points["p16 s0"]["pareto_samples"] and points["p8 s0"]["pareto_samples"]
    assert not points["lora s0"]["pareto_samples"]


def heldout_sweep(client, name, tmp_path):
    """(experiment id, sweep run id) of an empty sweep selecting on the held-out loss."""
    exp = client.create_experiment(name, artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp, tags={"plora.run_type": "sweep", "plora.mode": "min",
                                          "plora.metric": "eval/heldout/loss"}).info.run_id
    return exp, parent


def test_importance_ranks_first_the_parameter_that_drives_the_metric(scratch, tmp_path):
    uri, client = scratch
    exp, parent = heldout_sweep(client, "imp", tmp_path)
    rng = np.random.default_rng(0)
    for i in range(24):
        lr, momentum = 10 ** rng.uniform(-5, -2), float(rng.uniform(0, 1))
        rid = client.create_run(exp, tags={
            "mlflow.parentRunId": parent, "plora.status": "finished",
            "space.optim.lr": str(lr), "space.plora.momentum": str(momentum),
            "space.lora.rank": str(int(rng.choice([1, 2, 4])))}).info.run_id
        loss = (np.log10(lr) + 3.5) ** 2  # the learning rate alone decides
        client.log_batch(rid, metrics=[Metric("eval/heldout/loss", loss, 0, 10)])
    from analysis.importance import param_importances
    from analysis.store import load_sweep
    imp = param_importances(load_sweep(uri, "imp"))
    assert imp["n_trials"] == 24 and imp["warning"] is None
    assert next(iter(imp["fanova"])) == "optim.lr"
    assert next(iter(imp["ped_anova"])) == "optim.lr"


def test_importance_scores_asha_stopped_trials_at_the_budget_all_reached(scratch, tmp_path):
    """Half the trials stopped early (ASHA) after the step-10 checkpoint: every trial is scored
    by its best value up to step 10, so the finished trials' later, better values (driven by
    momentum alone) cannot make momentum look important."""
    uri, client = scratch
    exp, parent = heldout_sweep(client, "imp-asha", tmp_path)
    rng = np.random.default_rng(1)
    for i in range(20):
        lr, momentum = 10 ** rng.uniform(-5, -2), float(rng.uniform(0, 1))
        stopped = i % 2 == 0
        rid = client.create_run(exp, tags={
            "mlflow.parentRunId": parent, "plora.status": "stopped_early" if stopped else "finished",
            "space.optim.lr": str(lr), "space.plora.momentum": str(momentum)}).info.run_id
        metrics = [Metric("eval/heldout/loss", 1 + (np.log10(lr) + 3.5) ** 2, 0, 10)]
        if not stopped:
            metrics.append(Metric("eval/heldout/loss", -10 * momentum, 0, 20))
        client.log_batch(rid, metrics=metrics)
    from analysis.importance import param_importances
    from analysis.store import load_sweep
    imp = param_importances(load_sweep(uri, "imp-asha"))
    assert imp["n_trials"] == 20 and imp["budget_step"] == 10
    assert next(iter(imp["fanova"])) == "optim.lr"


def two_trial_report(client, uri, tmp_path, name, status):
    """Report of a sweep: LoRA finished, PLoRA/16 with `status` after 2 of 4 checkpoints."""
    exp = client.create_experiment(name, artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp, tags={"plora.run_type": "sweep"}).info.run_id
    log_trial(client, exp, parent, tmp_path, config="lora", seed=0, space=LORA,
              acc=[20, 24, 26, 28], heldout=[2.0, 1.6, 1.4, 1.3])
    log_trial(client, exp, parent, tmp_path, config="p16", seed=0, space=P16, status=status,
              acc=[22, 28], heldout=[1.8, 1.35], train_steps=20)
    return write_report(uri, name, out_dir=tmp_path / "r", log_to_mlflow=False).read_text()


def test_partial_sweep_is_marked_partial(scratch, tmp_path):
    uri, client = scratch
    md = two_trial_report(client, uri, tmp_path, "live", "running")
    assert "**PARTIAL: the sweep is still running** — 1 of 2 trials" in md
    assert "16 (partial)" in md
    assert json.loads((tmp_path / "r" / "report.json").read_text())["partial"] is True


def test_trial_stopped_early_is_marked_with_its_samples(scratch, tmp_path):
    uri, client = scratch
    md = two_trial_report(client, uri, tmp_path, "asha", "stopped_early")
    assert "16 (stopped early at 160 samples)" in md and "(partial)" not in md


def test_compare_shows_paired_differences(store, capsys):
    runs = store["runs"]
    assert cli(["compare", runs["P8_0"], runs["L0"], "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("| eval/arc_easy/acc_norm"))
    assert "+0.1500" in line and "paired (40 items)" in line and line.endswith("| A |")
    loss = next(l for l in out.splitlines() if l.startswith("| eval/heldout/loss"))
    assert "+0.1000" in loss and loss.endswith("| B |")


def test_bad_experiment_is_one_line_and_exit_2(store, capsys):
    assert cli(["report", "--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --experiment: no experiment named 'nope'")
    assert len(err.splitlines()) == 1


def test_columns_follow_the_papers_order():
    from types import SimpleNamespace
    from analysis.results import eval_metric_keys
    keys = ["eval/heldout/loss", "eval/arc_challenge/acc_norm", "eval/mmlu/acc",
            "eval/mmlu/stem", "eval/arc_easy/acc_norm", "eval/gsm8k/strict", "eval/mmlu/other",
            "eval/samples", "eval/gsm8k/strict_stderr", "eval/zz/x"]
    assert eval_metric_keys([SimpleNamespace(metric_keys=keys)]) == [
        "eval/gsm8k/strict", "eval/mmlu/other", "eval/mmlu/stem", "eval/mmlu/acc",
        "eval/arc_easy/acc_norm", "eval/arc_challenge/acc_norm", "eval/heldout/loss",
        "eval/zz/x"]


def test_analysis_imports_nothing_from_plora_ray_ray_or_torch():
    import subprocess
    import sys
    code = ("import sys, analysis, analysis.report, analysis.compare, analysis.__main__;"
            "print([m for m in sys.modules if m.split('.')[0] in ('plora_ray', 'ray', 'torch')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_item_scores_weight_heldout_by_tokens_and_split_mmlu_by_category():
    from analysis.results import item_scores
    items = {"tasks": {
        "heldout": {"ids": ["h0", "h1"], "loss": [1.0, 3.0], "tokens": [3, 1]},
        "mmlu": {"ids": ["m0", "m1", "m2"], "acc": [1, 0, 1],
                 "category": ["stem", "other", "stem"]}}}
    ids, loss, weights = item_scores(items, "eval/heldout/loss")
    assert np.average(loss, weights=weights) == pytest.approx(1.5)
    ids, acc, weights = item_scores(items, "eval/mmlu/stem")
    assert ids == ["m0", "m2"] and acc.tolist() == [1, 1] and weights is None
    assert item_scores(items, "eval/mmlu/acc")[1].tolist() == [1, 0, 1]


def test_missing_store_or_sweep_run_is_one_line_and_exit_2(store, tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli(["report", "--experiment", "unload", "--tracking-uri", missing]) == 2
    assert "--tracking-uri: no MLflow database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert cli(["report", "--experiment", "unload", "--sweep", "0" * 32,
                "--tracking-uri", store["uri"]]) == 2
    assert capsys.readouterr().err.startswith("error: --sweep: no run")


def test_sweep_without_checkpoints_yet_reports_training_curves_only(scratch, tmp_path):
    uri, client = scratch
    exp = client.create_experiment("early", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp, tags={"plora.run_type": "sweep"}).info.run_id
    log_trial(client, exp, parent, tmp_path, config="p16", seed=0, space=P16, status="running",
              acc=[], heldout=[], train_steps=6)
    md = write_report(uri, "early", out_dir=tmp_path / "r", log_to_mlflow=False).read_text()
    assert "No checkpoint has been evaluated yet" in md and "PARTIAL" in md
    assert (tmp_path / "r" / "train_loss.png").exists()


def test_searched_floats_print_to_four_significant_digits():
    from analysis.results import show
    assert show(0.0006977519928308486) == "0.0006978" and show(0.38128931940501426) == "0.3813"
    assert show(16) == "16" and show(None) == "None" and show("keep") == "keep"


def test_benchmark_categories_of_too_few_items_are_left_out(scratch, tmp_path):
    """MMLU on 20 items spread over subjects: 12 stem, 4 humanities, 4 other. The categories of 4
    items say nothing (1 of 4 right: a 95 % interval of [0.05, 0.70]): no column, figure or
    paired row; stem (12 items) and the overall accuracy stay, with Wilson intervals."""
    from scipy.stats import binomtest
    from analysis.results import build_table, eval_metric_keys, small_groups
    from analysis.store import load_sweep
    uri, client = scratch
    exp, parent = heldout_sweep(client, "categories", tmp_path)
    category = ["stem"] * 12 + ["humanities"] * 4 + ["other"] * 4
    acc = [1] * 6 + [0] * 6 + [1, 0, 0, 0] + [1, 1, 0, 0]
    rid = client.create_run(exp, tags={"mlflow.parentRunId": parent, "plora.status": "finished",
                                       "plora.seed": "0", "space.seed": "0", "space.method": "lora"}).info.run_id
    client.log_batch(rid, metrics=[Metric("eval/heldout/loss", 1.0, 0, 10)] + [
        Metric(f"eval/mmlu/{name}", float(np.mean([a for a, c in zip(acc, category) if c == name or name == "acc"])), 0, 10)
        for name in ("acc", "stem", "humanities", "other")])
    path = tmp_path / "step_0000010.json"
    path.write_text(json.dumps({"step": 10, "samples": 80, "tasks": {"mmlu": {
        "ids": [f"m{i}" for i in range(20)], "acc": acc, "category": category}}}))
    client.log_artifact(rid, str(path), artifact_path="items")
    sweep = load_sweep(uri, "categories")
    assert small_groups(sweep.trials) == {"eval/mmlu/humanities": 4, "eval/mmlu/other": 4}
    assert eval_metric_keys(sweep.trials) == ["eval/mmlu/stem", "eval/mmlu/acc", "eval/heldout/loss"]
    table = build_table(sweep, "last")
    cell = table.cells["eval/mmlu/acc"][0]
    wilson = binomtest(9, 20).proportion_ci(method="wilson")
    assert (cell.value, cell.lo, cell.hi) == pytest.approx((0.45, wilson.low, wilson.high))
    md = write_report(uri, "categories", out_dir=tmp_path / "r", log_to_mlflow=False).read_text()
    assert "| mmlu/stem |" in md and "| mmlu/humanities |" not in md and "| mmlu/other |" not in md
    assert "Left out: `eval/mmlu/humanities`" in md  # said, not silently dropped
    assert not (tmp_path / "r" / "eval_mmlu_humanities.png").exists()



def test_report_puts_the_sweep_metric_first_and_shows_one_table_when_best_is_last(store):
    numbers, md = store["numbers"], store["md"]
    select = numbers["selection_metric"]
    header = next(line for line in md.splitlines() if line.startswith("| ") and "seeds" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    first_metric = next(c for c in cols if c.endswith("(sweep metric)"))
    assert first_metric == select[len("eval/"):] + " (sweep metric)"
    assert cols.index(first_metric) < min(cols.index(c) for c in cols if c not in (first_metric,) and "/" in c)
    tables = md.count("## Results at the")
    assert tables == (1 if numbers["tables_identical"] else 2)
    assert numbers["tables"]["best"] and numbers["tables"]["last"]
