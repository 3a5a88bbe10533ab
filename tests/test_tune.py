"""The main command on a real local Ray cluster and a real SQLite MLflow store (tiny model)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from analysis.store import sweep_trials
from plora_ray.tracking.driver import default_tracking_uri
from plora_ray.cli.tune import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def base(**extra):
    run = {"name": "t", "method": "plora", "checkpoint_every_steps": 2, "log_every_steps": 100,
           "model": {"name_or_path": "tiny"},
           "lora": {"rank": 2, "target_modules": ["q_proj", "v_proj"]},
           "plora": {"unload_every_steps": 2, "momentum": 0.1},
           "optim": {"lr": 1e-3},
           "data": {"train_files": ["tiny-dialogues"], "max_length": 64, "micro_batch_size": 4,
                    "gradient_accumulation_steps": 1, "max_steps": 6}}
    for key, value in extra.items():
        run.setdefault(key, {}).update(value) if isinstance(value, dict) else run.__setitem__(key, value)
    return run


def write_space(tmp_path, **fields):
    data = {"name": "t", "metric": "train/loss", "mode": "min", "searcher": {"type": "optuna", "seed": 0},
            "num_samples": 4, "max_concurrent": 2, "resources": {"workers": 1, "cpus_per_worker": 1},
            "base": base(), "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                      "plora.momentum": {"choice": [0.0, 0.3]}}}
    data.update(fields)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def history(uri, run_id, key):
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def test_optuna_asha_sweep_logs_one_run_per_trial_with_curves(tmp_path, capsys):
    space = write_space(tmp_path, scheduler={"type": "asha", "grace_period": 1, "max_t": 3},
                        base=base(eval={"tasks": ["arc_easy"], "limit": 2, "batch_size": 2}))
    assert main([str(space), "--storage", str(tmp_path / "sweeps")]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    out = [line for line in lines if "pid=" not in line]  # the driver's own (workers': "(… pid=…) …")
    assert out[-1].startswith("compare the runs: mlflow ui --backend-store-uri sqlite:////")
    assert out[-2].startswith("report: ") and Path(out[-2].split(": ", 1)[1]).is_file()  # analysis/
    assert out[-3].startswith(f"export it: python -m plora_ray.export {out[-4].split(': ', 1)[1]} exports/t-")
    assert out[-4].startswith("checkpoint of the top trial: ") and Path(out[-4].split(": ", 1)[1]).is_dir()
    assert out[-5].startswith(("Best: ", "No configuration is distinguishable", "Only one configuration"))
    uri = default_tracking_uri(tmp_path / "sweeps")
    sweep = json.loads((tmp_path / "sweeps" / "t.latest.json").read_text())
    trials = sweep_trials(uri, sweep["parent_run_id"])
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(sweep["parent_run_id"], "report")}
    assert "report/report.md" in logged and any(p.endswith(".png") for p in logged)  # shown in the UI
    assert len({t["name"][:15] for t in trials}) == 4  # names the MLflow UI tells apart
    for t in trials:
        assert t["status"] in ("finished", "stopped_early")
        assert t["name"].startswith(("lr", "#")) and t["tags"]["space.optim.lr"] == t["params"]["optim.lr"]
        steps = [s for s, _ in history(uri, t["run_id"], "train/loss")]
        ranks = [s for s, _ in history(uri, t["run_id"], "plora/accumulated_rank")]
        evals = [s for s, _ in history(uri, t["run_id"], "eval/arc_easy/acc")]
        if t["status"] == "finished":
            assert (steps, ranks, evals) == (list(range(1, 7)), [2, 4, 6], [2, 4, 6])
        else:  # stopped at a report; what its workers logged before they were killed stays
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
            assert ranks == [2, 4, 6][:len(ranks)] and evals == [2, 4, 6][:len(evals)] and evals
        assert t["params"]["lora.rank"] == "2"
        # the console: each trial's step of its total with the time left (from its worker)
        assert any(f"{t['name']}: step 1/6 (16%), " in line and " left" in line for line in lines)
        phases = history(uri, t["run_id"], "phase/steps_s")  # once, at the end (a stopped trial may not get there)
        assert len(phases) == 1 if t["status"] == "finished" else len(phases) <= 1
        assert history(uri, t["run_id"], "eval/samples") == [(s, 4 * s) for s in evals]  # 4 samples a step
    # ... and the sweep's trials done of the total, elapsed, an estimate; none of Ray's noise
    sweep_lines = [line for line in out if line.startswith(f"sweep {sweep['name']}: ") and " trials done" in line]
    assert any(re.search(r": [123] of 4 trials done.*elapsed, ~\d+[smh]", line) for line in sweep_lines)
    assert sweep_lines[-1].startswith(f"sweep {sweep['name']}: 4 of 4 trials done; ") and sweep_lines[-1].endswith(", done")
    assert "tensorboard" not in captured.out.lower() and "Reporting training result" not in captured.err
    assert "snapshotting has been triggered" not in captured.out + captured.err  # Tune's, after checkpoints
    assert "Checkpoint successfully created" not in captured.out + captured.err  # each stored checkpoint


def test_rays_log_deduplication_keeps_every_progress_line_and_drops_the_startup_warning():
    """The settings the sweep gives Ray's driver (plora_ray/ray/progress.py), through Ray's own
    deduplicator: two trials' look-alike lines (equal without their digits) within its window
    are both printed at once, not folded into one "[repeated 2x]" line seconds later."""
    from ray._private.ray_logging import LogDeduplicator

    from plora_ray.ray.progress import DRIVER_LOG_SETTINGS, TrialProgress, duration

    def printed(settings):
        dedup = LogDeduplicator(5, settings.get("RAY_DEDUP_LOGS_ALLOW_REGEX"),
                                settings.get("RAY_DEDUP_LOGS_SKIP_REGEX"), _timesource=lambda: 0.0)
        out = []
        for pid, line in [(1, "lr0.001 s0: step 3/64 (4%), 1m00s elapsed, ~20m20s left"),
                          (2, "lr0.002 s1: step 4/64 (6%), 1m21s elapsed, ~20m03s left"),
                          (1, "step 8: loss 1.2345  lr 1.00e-03  samples 32  900 tok/s"),
                          (2, "step 8: loss 1.3345  lr 1.00e-03  samples 32  910 tok/s"),
                          ("raylet", "WARNING: 8 PYTHON worker processes have been started on node: x")]:
            for batch in dedup.deduplicate({"ip": "h", "pid": pid, "lines": [line]}):
                out += batch["lines"]
        return out

    assert len(printed({})) == 3  # Ray's defaults: the second of each pair held back
    assert printed(DRIVER_LOG_SETTINGS) == [
        "lr0.001 s0: step 3/64 (4%), 1m00s elapsed, ~20m20s left",
        "lr0.002 s1: step 4/64 (6%), 1m21s elapsed, ~20m03s left",
        "step 8: loss 1.2345  lr 1.00e-03  samples 32  900 tok/s",
        "step 8: loss 1.3345  lr 1.00e-03  samples 32  910 tok/s"]
    clock, lines = [0.0], []
    progress = TrialProgress("u8 s0", 64, 0, final_evaluation=True, every_s=30, clock=lambda: clock[0],
                             write=lines.append)
    for step in range(1, 65):
        clock[0] = step * 20.0  # 20 s a step: a line at the first, every 30 s (2 steps), and the last
        progress.step(step)
    assert len(lines) == 1 + 31 + 1 and DRIVER_LOG_SETTINGS["RAY_DEDUP_LOGS_ALLOW_REGEX"]
    assert lines[1] == "u8 s0: step 3/64 (4%), 1m00s elapsed, ~20m20s left (then the final evaluation)"
    assert lines[-1] == "u8 s0: step 64/64 (100%), training done in 21m20s; the final evaluation follows"
    assert (duration(59.6), duration(3725)) == ("1m00s", "1h02m")


def test_diverging_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    space = write_space(tmp_path, searcher={"type": "grid"}, num_samples=1,
                        space={"optim.lr": {"grid": [1e-3, 10.0]}},  # full fine-tuning at lr 10 blows up
                        base=base(method="full", optim={"max_grad_norm": None}))
    assert main([str(space), "--storage", str(tmp_path / "sweeps"), "--no-report"]) == 0
    uri = default_tracking_uri(tmp_path / "sweeps")
    sweep = json.loads((tmp_path / "sweeps" / "t.latest.json").read_text())
    status = {t["params"]["optim.lr"]: t["status"] for t in sweep_trials(uri, sweep["parent_run_id"])}
    assert status == {"0.001": "finished", "10.0": "diverged"}
    assert "Only one configuration finished with train/loss" in capsys.readouterr().out


def test_repeats_run_every_configuration_with_distinct_seeds_and_the_summary_aggregates_them(tmp_path, capsys):
    space = write_space(tmp_path, searcher={"type": "grid"}, num_samples=1, repeats=2,
                        space={"lora.rank": {"grid": [1, 4]}},
                        base=base(data={"max_steps": 2}, checkpoint_every_steps=None))
    assert main([str(space), "--storage", str(tmp_path / "sweeps"), "--no-report"]) == 0
    out = capsys.readouterr().out
    uri = default_tracking_uri(tmp_path / "sweeps")
    parent = json.loads((tmp_path / "sweeps" / "t.latest.json").read_text())["parent_run_id"]
    trials = sweep_trials(uri, parent)
    assert sorted(t["name"] for t in trials) == [f"r{r} s{s}" for r in (1, 4) for s in range(2)]
    by_config = {}
    for t in trials:
        assert t["status"] == "finished" and t["mlflow_status"] == "FINISHED"
        assert t["params"]["seed"] == t["seed"] and "output_dir" not in t["params"]
        by_config.setdefault(t["config_id"], set()).add(t["seed"])
    assert list(by_config.values()) == [{"0", "1"}] * 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_yaml = yaml.safe_load(Path(client.download_artifacts(trials[0]["run_id"], "config/run.yaml")).read_text())
    assert run_yaml["seed"] == int(trials[0]["seed"]) and run_yaml["lora"]["rank"] == int(trials[0]["space"]["lora.rank"])
    stored = json.loads(Path(client.download_artifacts(parent, "summary/summary.json")).read_text())
    assert [c["seeds"] for c in stored["configs"]] == [2, 2]
    assert stored["configs"][1]["diff_method"] == "Welch t across seeds (2 vs 2)"
    assert client.get_run(parent).info.status == "FINISHED"
    assert stored["sentence"] in out and "| r1 | 2 |" in out and "| r4 | 2 |" in out


def test_trial_that_fails_for_good_ends_failed_not_running(tmp_path, monkeypatch, capsys):
    import plora_ray.sweep.tune as sweep_tune

    data = tmp_path / "train.jsonl"
    data.write_text((ROOT / "plora_ray" / "resources" / "tiny_dialogues.jsonl").read_text())
    real_build = sweep_tune.build_tuner

    def build_then_break_the_data(*args, **kwargs):  # validated, then broken: every worker fails
        data.write_text("not a json line\n")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(sweep_tune, "build_tuner", build_then_break_the_data)
    # no restart, no retry: it fails at once (the retries themselves: tests/test_cluster.py)
    space = write_space(tmp_path, searcher={"type": "grid"}, num_samples=1, space={"lora.rank": {"grid": [2]}},
                        failures={"worker_restarts": 0, "trial_retries": 0},
                        base=base(data={"train_files": [str(data)], "max_steps": 2}))
    assert main([str(space), "--storage", str(tmp_path / "sweeps"), "--no-report"]) == 1  # every trial failed
    assert "No trial finished with train/loss" in capsys.readouterr().out
    uri = default_tracking_uri(tmp_path / "sweeps")
    parent = json.loads((tmp_path / "sweeps" / "t.latest.json").read_text())["parent_run_id"]
    [trial] = sweep_trials(uri, parent)
    assert (trial["status"], trial["mlflow_status"]) == ("failed", "FAILED")


def test_bad_search_space_files_exit_2_with_one_line(tmp_path, capsys):
    from test_search_space import BAD

    assert len(BAD) >= 15
    for case_id, data, overrides, fragment in BAD:
        path = tmp_path / f"{case_id}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = [str(path), "--dry-run"] + [x for o in overrides for x in ("--set", o)]
        assert main(argv) == 2, case_id
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (case_id, err)


def test_shipped_spaces_validate_in_dry_run(capsys):
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        assert main([str(path), "--dry-run"]) == 0, path
    assert "trials" in capsys.readouterr().out


def test_a_trial_resumed_from_its_final_checkpoint_reports_that_result_again_without_training(tmp_path):
    """A sweep's driver killed after a trial's final checkpoint, before Tune recorded the trial's
    end: ``--resume`` restarts the trial from that checkpoint, with no step left to train."""
    import shutil

    import torch
    from ray.tune import Checkpoint

    from plora_ray.config.io import build_run_config
    from plora_ray.ray.worker import run_loop

    cfg = build_run_config(base(data={"max_steps": 2}))
    score = {"metric": "train/loss", "key": "checkpoint_score"}
    first, again = [], []

    def keep(reports):
        def report(metrics, directory):
            if directory:  # Ray would copy it into the trial's storage
                shutil.copytree(directory, tmp_path / f"step{metrics['step']}")
            reports.append((dict(metrics), directory is not None))
        return report

    assert run_loop(cfg, 0, 1, torch.device("cpu"), None, keep(first), "node", score=score) is False
    assert [(m["step"], m["final"], written) for m, written in first] == [(2, True, True)]
    resumed = Checkpoint.from_directory(str(tmp_path / "step2"))
    assert run_loop(cfg, 0, 1, torch.device("cpu"), resumed, keep(again), "node", score=score) is False
    [(metrics, written)] = again
    assert not written and metrics["final"] and metrics["step"] == 2  # no step trained, no checkpoint
    assert metrics["train/loss"] == first[0][0]["train/loss"] and metrics["node_id"] == "node"
