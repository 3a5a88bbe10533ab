"""The training-set loss (eval.train_loss -> eval/train/loss) and the report's headroom section
(full FT vs LoRA, the fraction of the gap PLoRA closes), on synthetic MLflow sweeps with a known
answer and on a real tiny run."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import Metric

from analysis import stats
from analysis.headroom import fieller, ratio_bootstrap
from analysis.report import write_report
from plora_ray.config.names import IGNORE

N_ITEMS = 40
CHECKPOINTS = (10, 20, 30, 40)
SAMPLES_PER_STEP = 8
TOKENS = np.array([10 + i % 7 for i in range(N_ITEMS)])
BASE = 2.0 + 0.5 * np.sin(np.arange(N_ITEMS))  # per-item difficulty, shared by every run


def _centred(x):  # token-weighted mean 0: a trial's loss is exactly its offsets
    x = np.asarray(x, float)
    return x - np.average(x, weights=TOKENS)


def curve(offset: float, seed_effect: float, rng) -> list[np.ndarray]:
    """Per checkpoint the per-item losses: descending to BASE + offset + seed effect at the
    last checkpoint (its best), item noise of weighted mean 0."""
    return [BASE + 0.4 * (1 - step / CHECKPOINTS[-1]) + offset + seed_effect
            + _centred(rng.normal(0, 0.05, N_ITEMS)) for step in CHECKPOINTS]


def log_trial(client, exp, parent, tmp, *, config, method, seed, space, train, heldout, acc=None):
    tags = {"mlflow.parentRunId": parent, "plora.run_type": "trial", "plora.status": "finished",
            "plora.config_id": config, "plora.seed": str(seed), "space.seed": str(seed),
            "space.method": method, **{f"space.{k}": str(v) for k, v in space.items()}}
    rid = client.create_run(exp, tags=tags, run_name=f"{config} s{seed}").info.run_id
    metrics = [Metric("train/samples", s * SAMPLES_PER_STEP, 0, s) for s in range(1, CHECKPOINTS[-1] + 1)]
    if method == "plora":  # an unload every 10 steps, rank 1 each
        metrics += [m for stage, s in enumerate(CHECKPOINTS, 1) for m in (
            Metric("plora/stage", stage, 0, s), Metric("plora/accumulated_rank", stage, 0, s))]
    for k, step in enumerate(CHECKPOINTS):
        tasks = {}
        for task, losses in (("train", train[k]), ("heldout", heldout[k])):
            metrics += [Metric(f"eval/{task}/loss", float(np.average(losses, weights=TOKENS)), 0, step),
                        Metric(f"eval/{task}/loss_stderr", stats.stderr(losses), 0, step)]
            tasks[task] = {"ids": [f"{task}-{i}" for i in range(N_ITEMS)], "loss": losses.tolist(),
                           "tokens": TOKENS.tolist()}
        metrics.append(Metric("eval/samples", step * SAMPLES_PER_STEP, 0, step))
        if acc is not None:  # a benchmark score without per-item results
            metrics.append(Metric("eval/arc_easy/acc", acc * step / CHECKPOINTS[-1], 0, step))
        path = tmp / f"step_{step:07d}.json"
        path.write_text(json.dumps({"step": step, "samples": step * SAMPLES_PER_STEP, "tasks": tasks}))
        client.log_artifact(rid, str(path), artifact_path="items")
    client.log_batch(rid, metrics=metrics)
    client.set_terminated(rid, status="FINISHED")


def make_sweep(client, root, name, runs, metric="eval/heldout/loss", mode="min"):
    exp = client.create_experiment(name, artifact_location=str(root / name))
    parent = client.create_run(exp, run_name=name, tags={
        "plora.run_type": "sweep", "plora.metric": metric, "plora.mode": mode}).info.run_id
    for config, method, seed, space, train, heldout, *acc in runs:
        tmp = root / name / f"{config}-{seed}"
        tmp.mkdir(parents=True)
        log_trial(client, exp, parent, tmp, config=config, method=method, seed=seed, space=space,
                  train=train, heldout=heldout, acc=acc[0] if acc else None)
    client.set_terminated(parent)


# train-loss offsets at the last checkpoint: LoRA 0.30 above full FT, PLoRA 0.15 (half way);
# held-out: 0.01 apart, inside the seed noise
TRAIN_OFF = {"lora": 0.30, "plora": 0.15, "full": 0.0, "lora-hot": 0.5}
HELD_OFF = {"lora": 0.01, "plora": 0.005, "full": 0.0, "lora-hot": 0.3}
SEED_EFFECT = [0.0, 0.08, -0.05]            # data order: shared by the methods at a seed
JITTER = np.random.default_rng(3).normal(0, 0.01, (4, 3))   # method x seed, train loss
HELD_JITTER = np.random.default_rng(4).normal(0, 0.03, (4, 3))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("headroom")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    runs, finals = [], {}
    for m, (config, method, space) in enumerate([
            ("lora", "lora", {"lora.rank": 1, "optim.lr": 0.002}),
            ("plora", "plora", {"lora.rank": 1, "optim.lr": 0.002}),
            ("full", "full", {"lora.rank": 1, "optim.lr": 0.0001}),
            ("lora-hot", "lora", {"lora.rank": 1, "optim.lr": 0.01})]):  # the worse LoRA: not compared
        for seed in range(3):
            train = curve(TRAIN_OFF[config] + JITTER[m, seed], SEED_EFFECT[seed], rng)
            held = curve(HELD_OFF[config] + HELD_JITTER[m, seed], SEED_EFFECT[seed], rng)
            runs.append((config, method, seed, space, train, held))
            finals[config, seed] = (float(np.average(train[-1], weights=TOKENS)),
                                    float(np.average(held[-1], weights=TOKENS)))
    make_sweep(client, root, "gap", runs)
    flat = np.random.default_rng(1)  # full FT = LoRA up to item noise, one seed each
    make_sweep(client, root, "flat", [  # 0.005 apart, inside the item noise
        (c, c, 0, {"lora.rank": 1}, curve(0.2 + d, 0, flat), curve(0.2 + d, 0, flat))
        for c, d in (("lora", 0.005), ("plora", 0.0), ("full", 0.0))])
    acc = {"lora": [0.50, 0.53, 0.49], "plora": [0.56, 0.57, 0.54], "full": [0.62, 0.64, 0.60]}
    same = curve(0.2, 0, flat)
    make_sweep(client, root, "acc", [(c, c, s, {"lora.rank": 1}, same, same, acc[c][s])
                                     for c in acc for s in range(3)], "eval/arc_easy/acc", "max")
    out = {"acc_values": acc}
    for name in ("gap", "flat", "acc"):
        path = write_report(uri, name, out_dir=root / f"report-{name}", log_to_mlflow=False)
        out[name] = {"md": path.read_text(), "dir": path.parent,
                     "numbers": json.loads((path.parent / "report.json").read_text())}
    return {"finals": finals, "uri": uri, **out}


def _gap(numbers, metric):
    (h,) = numbers["headroom"]
    return h, next(g for g in h["gaps"] if g["metric"] == metric)


def test_plora_closes_half_the_train_loss_gap_with_a_paired_interval(store):
    h, g = _gap(store["gap"]["numbers"], "eval/train/loss")
    assert (h["lora"], h["full"]) == ("method=lora optim.lr=0.002", "method=full optim.lr=0.0001")
    assert h["plora"] == "method=plora optim.lr=0.002"  # the hot LoRA is not the one compared
    f = store["finals"]
    lora, plora, full = (np.array([f[c, s][0] for s in range(3)]) for c in ("lora", "plora", "full"))
    assert g["values"]["lora"] == pytest.approx(lora.mean()) and g["values"]["full"] == pytest.approx(full.mean())
    assert g["gap"]["value"] == pytest.approx((lora - full).mean()) and g["gap"]["n"] == 3
    assert 0 < g["gap"]["lo"] < 0.3 < g["gap"]["hi"] and g["gap_items"]["lo"] > 0 and g["headroom"]
    frac = g["fraction"]
    assert frac["value"] == pytest.approx((lora - plora).mean() / (lora - full).mean())
    assert frac["lo"] < 0.5 < frac["hi"] and 0 < frac["lo"] and frac["hi"] < 1  # ~half, told apart from 0 and 1
    items = g["fraction_items"]
    assert items["n"] == N_ITEMS and items["lo"] < items["value"] < items["hi"]
    assert items["value"] == pytest.approx(frac["value"])  # seed means of token-weighted losses
    assert g["verdict"] == "PLoRA closes part of the gap: ahead of LoRA, short of full FT"
    md = store["gap"]["md"]
    assert "## Headroom: full FT vs LoRA, and the gap PLoRA closes" in md
    assert f"| `eval/train/loss` | {lora.mean():.4f} | {plora.mean():.4f} | {full.mean():.4f} |" in md


def test_held_out_gap_inside_the_noise_is_no_headroom(store):
    _, g = _gap(store["gap"]["numbers"], "eval/heldout/loss")
    assert g["gap"]["lo"] < 0 < g["gap"]["hi"] and not g["headroom"]
    assert g["fraction"] is None and g["fraction_items"] is None  # no gap: nothing to close
    assert "- `eval/heldout/loss`: full FT not distinguishable from LoRA: no headroom to close." in store["gap"]["md"]


def test_learning_ability_on_training_and_held_out_loss(store):
    h, _ = _gap(store["gap"]["numbers"], "eval/train/loss")
    rows = {a["target"]: a for a in h["learning_ability"]}
    assert set(rows) == {"training-set loss", "held-out loss"}
    # LoRA's best train loss is at its last checkpoint (320 samples); PLoRA, 0.15 lower at every
    # checkpoint, passes it one checkpoint earlier (240 samples)
    assert rows["training-set loss"]["speed_per_seed"] == pytest.approx([320 / 240] * 3)
    f = store["finals"]
    assert rows["training-set loss"]["quality_per_seed"] == pytest.approx(
        [f["plora", s][0] / f["lora", s][0] for s in range(3)])
    assert "| training-set loss (`eval/train/loss`) |" in store["gap"]["md"]


def test_gap_closed_vs_accumulated_rank_figure(store):
    import matplotlib.image as mpimg

    h, _ = _gap(store["gap"]["numbers"], "eval/train/loss")
    assert h["figure"] == "headroom_rank1.png"
    assert mpimg.imread(store["gap"]["dir"] / h["figure"]).shape[:2] == (450, 800)


def test_no_headroom_sweep_says_so_on_every_metric(store):
    numbers, md = store["flat"]["numbers"], store["flat"]["md"]
    (h,) = numbers["headroom"]
    for g in h["gaps"]:  # one seed a side: paired over the items only
        assert g["gap"]["n"] == 1 and math.isnan(g["gap"]["lo"])  # no interval across seeds
        assert g["gap_items"]["lo"] < 0 < g["gap_items"]["hi"]
        assert not g["headroom"] and g["fraction"] is None
    assert md.count("no headroom to close") >= 2 and "PLoRA closes part" not in md
    assert h["figure"] is None  # no gap: no fraction per checkpoint either


def test_a_higher_is_better_gap_is_full_minus_lora(store):
    """An accuracy: the gap is full FT − LoRA (positive: full FT ahead), the fraction the same
    ratio; no per-item results: paired by seed only."""
    _, g = _gap(store["acc"]["numbers"], "eval/arc_easy/acc")
    lora, plora, full = (np.array(store["acc_values"][c]) for c in ("lora", "plora", "full"))
    assert g["gap"]["value"] == pytest.approx((full - lora).mean()) and g["gap"]["lo"] > 0
    assert math.isnan(g["gap_items"]["lo"]) and g["headroom"]
    assert g["fraction"]["value"] == pytest.approx((lora - plora).mean() / (lora - full).mean())
    assert g["fraction"]["lo"] < g["fraction"]["value"] < g["fraction"]["hi"]
    _, flat = _gap(store["acc"]["numbers"], "eval/train/loss")
    assert not flat["headroom"] and flat["fraction"] is None


def test_no_section_without_full_fine_tuning(store):
    from analysis.headroom import headroom
    from analysis.store import load_sweep

    sweep = load_sweep(store["uri"], "gap")
    assert len(headroom(sweep)) == 1
    sweep.trials = [t for t in sweep.trials if t.param("method") != "full"]
    assert headroom(sweep) == []


def test_fieller_is_the_set_of_ratios_a_paired_t_test_keeps():
    a, b = [0.16, 0.13, 0.15, 0.18], [0.31, 0.29, 0.33, 0.30]
    res = fieller(a, b)
    grid = np.linspace(0, 1, 20001)
    kept = [r for r in grid if stats.distinguishable(*_t(np.subtract(a, np.multiply(r, b)))) is False]
    assert res["value"] == pytest.approx(np.mean(a) / np.mean(b))
    assert (res["lo"], res["hi"]) == pytest.approx((kept[0], kept[-1]), abs=1e-4)
    assert math.isnan(fieller(a, [0.1, -0.1, 0.05, -0.04])["lo"])  # denominator not told from 0
    assert math.isnan(fieller(a[:1], b[:1])["lo"])
    boot = ratio_bootstrap(a, b, weights=[1, 2, 1, 1])
    assert boot["value"] == pytest.approx((0.16 + 0.26 + 0.15 + 0.18) / (0.31 + 0.58 + 0.33 + 0.30))


def _t(d):
    mean, se = stats.mean_stderr(d)
    half = stats.t_quantile(0.975, len(d) - 1) * se
    return mean - half, mean + half


# ============================================================================ the training-set loss


def test_train_loss_subset_is_seeded_disjoint_from_heldout_and_the_same_for_every_run_seed(tiny_cfg):
    from plora_ray.evaluation.heldout import prepare_train_eval, split_heldout

    rows = [{"input_ids": [i], "labels": [IGNORE, i]} for i in range(50)]
    cfg = tiny_cfg(eval={"heldout": {"fraction": 0.2, "seed": 5}, "train_loss": {"limit": 8, "seed": 1}})
    picked = prepare_train_eval(cfg, rows)
    train, held = split_heldout(rows, 0.2, 5)
    ids = [int(e["id"].removeprefix("train-")) for e in picked]
    assert len(picked) == 8 and ids == sorted(ids) and all(rows[i]["input_ids"] == e["input_ids"]
                                                           for i, e in zip(ids, picked))
    assert not set(ids) & {int(h["id"].removeprefix("train-")) for h in held}  # only rows it trains on
    assert prepare_train_eval(tiny_cfg(seed=7, eval={"heldout": {"fraction": 0.2, "seed": 5},
                                                     "train_loss": {"limit": 8, "seed": 1}}), rows) == picked
    assert prepare_train_eval(tiny_cfg(eval={"heldout": {"fraction": 0.2, "seed": 5},
                                             "train_loss": {"limit": 8, "seed": 2}}), rows) != picked
    every = prepare_train_eval(tiny_cfg(eval={"heldout": {"fraction": 0.2, "seed": 5},
                                              "train_loss": {"limit": None}}), rows)
    assert [e["input_ids"] for e in every] == [e["input_ids"] for e in train]
    assert prepare_train_eval(tiny_cfg(), rows) == []


def test_train_loss_config_errors_and_dry_run(tiny_cfg, tmp_path):
    from plora_ray.config.schema import ConfigError
    from plora_ray.config.sweep import load_sweep
    from plora_ray.sweep.space import describe_eval

    with pytest.raises(ConfigError, match=r"field 'eval.train_loss.limit'"):
        tiny_cfg(eval={"train_loss": {"limit": 0}})
    assert "training-set loss (16 training examples, seed 0)" in describe_eval(
        tiny_cfg(eval={"train_loss": {"limit": 16}}))
    path = tmp_path / "s.yaml"
    path.write_text("metric: eval/train/loss\nbase: {plora: {unload_every_steps: 2}}\n"
                    "space: {optim.lr: {choice: [0.001, 0.002]}}\n")
    with pytest.raises(ConfigError, match=r"field 'metric': eval/train/loss is never measured.*train_loss"):
        load_sweep(path)
    path.write_text("metric: eval/train/loss\nbase: {plora: {unload_every_steps: 2}, "
                    "eval: {train_loss: {limit: 4}}}\nspace: {optim.lr: {choice: [0.001, 0.002]}}\n")
    assert load_sweep(path).mode == "min"


def _hand_loss(model, examples) -> float:
    """Token-weighted teacher-forced loss, one unpadded forward per example."""
    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
            labels = torch.tensor(e["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    model.train(was)
    return total / count


def test_real_run_logs_train_loss_at_every_checkpoint_equal_to_a_hand_computation(tiny_cfg):
    from plora_ray.run.loop import fit, setup

    cfg = tiny_cfg(data={"max_steps": 4}, checkpoint_every_steps=2,
                   eval={"heldout": {"fraction": 0.1, "limit": 3}, "train_loss": {"limit": 5}})
    run = setup(cfg)
    assert [e["id"] for e in run.train_eval] and all(e["id"].startswith("train-") for e in run.train_eval)
    hand = []

    def on_checkpoint(run, final, scores):
        hand.append((_hand_loss(run.model, run.train_eval), scores, run.items["train"]))

    fit(run, on_checkpoint=on_checkpoint, progress=False)
    assert len(hand) == 2 and [e["step"] for e in run.evals] == [2, 4]
    for expect, scores, items in hand:
        assert scores["eval/train/loss"] == pytest.approx(expect, abs=1e-5)
        assert "eval/train/loss_stderr" in scores and "eval/heldout/loss" in scores
        assert items["ids"] == [e["id"] for e in run.train_eval] and len(items["loss"]) == 5
    assert hand[0][0] != hand[1][0]  # measured on the model as it trains


def _rank_worker(rank: int, world: int, port: int, out: str, cfg_json: str) -> None:
    import torch.distributed as dist

    from plora_ray.config.schema import RunConfig
    from plora_ray.run.loop import evaluate_run, setup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    run = setup(RunConfig.model_validate_json(cfg_json), rank, world)
    metrics = evaluate_run(run)
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump((metrics, run.items["train"]), f)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_score_the_same_train_loss_as_one_process(tiny_cfg, tmp_path):
    """Each rank scores every second training example; the gathered records are one
    process's, on every rank."""
    import torch.multiprocessing as mp

    from plora_ray.run.loop import evaluate_run, setup

    cfg = tiny_cfg(method="lora", eval={"heldout": {"files": []}, "train_loss": {"limit": 5}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path), cfg.model_dump_json()), nprocs=2, join=True)
    run = setup(cfg)
    single = evaluate_run(run), run.items["train"]
    for r in range(2):
        metrics, items = pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())
        assert items["ids"] == single[1]["ids"] and items["tokens"] == single[1]["tokens"]
        assert items["loss"] == pytest.approx(single[1]["loss"], abs=1e-5)
        assert metrics["eval/train/loss"] == pytest.approx(single[0]["eval/train/loss"], abs=1e-5)
