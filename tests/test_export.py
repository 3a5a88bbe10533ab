"""``python -m plora_ray.export``: a trained PLoRA run (unloads included) as a Hugging Face folder
that ``from_pretrained`` and lm-eval load with the checkpoint's logits, or as an adapter to the
base model; bad input refused in one line before any work; and a sweep that keeps each trial's
best checkpoint by its metric (plus the latest), drops the others and prints the export command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from plora_ray.cli.export import main

ROOT = Path(__file__).resolve().parents[1]
RUN = {"name": "export", "method": "plora", "seed": 0, "log_every_steps": 100,
       "model": {"name_or_path": "tiny", "dtype": "float32"},
       "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
       "plora": {"unload_every_steps": 2, "momentum": 0.1}, "optim": {"lr": 1e-2},
       "data": {"train_files": ["tiny-dialogues"], "max_length": 64, "micro_batch_size": 4,
                "gradient_accumulation_steps": 1, "max_steps": 5}}
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-process PLoRA run of 5 steps with unloads at steps 2 and 4: its output directory."""
    from plora_ray.config.io import build_run_config
    from plora_ray.run.local import run_local

    out = tmp_path_factory.mktemp("export") / "run"
    summary = run_local(build_run_config(RUN), out, resume=False)
    assert summary["unloads"] == 2
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def reference(run_dir: Path, dtype: str = "float32") -> torch.Tensor:
    """The checkpoint's model, rebuilt in this process (base + ledger replay + live adapter)."""
    from plora_ray.run.rundir import load_trained

    return logits(load_trained(run_dir / "checkpoint", dtype)[0])


def test_float32_export_loads_with_from_pretrained_and_gives_the_checkpoints_logits(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from plora_ray.config.io import build_run_config
    from plora_ray.run.models import load_base
    from plora_ray.run.rundir import restore_run

    out = tmp_path / "hf"
    assert main([str(trained), str(out), "--dtype", "float32", "--max-shard-size", "200KB"]) == 0
    assert capsys.readouterr().out.startswith("exported merged model (float32, ")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".hf.partial-*"))  # written beside OUT, moved into place
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    got = logits(model)
    assert torch.equal(got, reference(trained))  # the same weights, bit for bit
    live = restore_run(trained / "checkpoint")  # the peft model as training left it, unmerged
    assert torch.allclose(got, logits(live.model), atol=1e-5, rtol=0)
    base = logits(load_base(build_run_config(RUN).model, seed=0)[0])
    assert (got - base).abs().max() > 1e-2  # the training (and its unloads) is in the export
    record = json.loads((out / "plora_export.json").read_text())
    assert (record["step"], record["unloads"], record["export"]) == (5, 2, "merged")


def test_default_export_is_bfloat16_and_lm_eval_scores_it(trained, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main([str(trained / "checkpoint"), str(out)]) == 0  # the checkpoint directory itself
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from plora_ray.run.rundir import load_trained

    trained_fp32 = load_trained(trained / "checkpoint", "float32")[0]
    weights = trained_fp32.state_dict()
    for name, w in model.state_dict().items():  # the checkpoint's weights, rounded once to bf16
        assert torch.equal(w, weights[name].to(torch.bfloat16)), name
    got, fp32 = logits(model), logits(trained_fp32)
    assert (got - fp32).abs().max() <= 0.05 * fp32.abs().max()  # bf16's 8-bit mantissa

    task = "plora_export_mc"
    items = [{"question": "2 + 2 =", "choices": ["3", "4", "5"], "gold": 1},
             {"question": "The sky is", "choices": ["green", "blue"], "gold": 1},
             {"question": "Ice is", "choices": ["hot", "cold"], "gold": 1}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{task}.yaml").write_text(yaml.safe_dump({
        "task": task, "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "items.jsonl")}, "cache_dir": str(tmp_path / "hf_data")},
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out}", tasks=[task], limit=2,
                                  task_manager=TaskManager(include_path=str(tasks)), device="cpu")
    assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
    assert len(res["samples"][task]) == 2


def test_adapter_export_is_the_whole_update_relative_to_the_base(trained, tmp_path, capsys):
    from peft import PeftModel

    from plora_ray.config.io import build_run_config
    from plora_ray.run.models import load_base

    out = tmp_path / "adapter"
    assert main([str(trained), str(out), "--adapter"]) == 0
    assert "adapter (relative to the base model) and unload ledger" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 * 2  # two unloaded stages + the live adapter, rank 2
    ledger = sorted(p.name for p in (trained / "checkpoint" / "ledger").iterdir())
    assert sorted(p.name for p in (out / "ledger").iterdir()) == ledger
    for name in ledger:
        assert (out / "ledger" / name).read_bytes() == (trained / "checkpoint" / "ledger" / name).read_bytes()
    uri = f"file://{trained / 'checkpoint'}"  # a checkpoint in remote storage, as a sweep prints it
    assert main([uri, str(tmp_path / "from_uri"), "--adapter"]) == 0
    assert json.loads((tmp_path / "from_uri" / "plora_export.json").read_text())["checkpoint"] == uri
    assert (tmp_path / "from_uri" / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".from_uri.*"))  # the downloaded copy is gone
    cfg = build_run_config(RUN).model
    merged = reference(trained)
    with_adapter = logits(PeftModel.from_pretrained(load_base(cfg, seed=0)[0], out))
    assert torch.allclose(with_adapter, merged, atol=1e-5, rtol=0)
    # the run's own adapter/ is the last stage only: on the base it is not the trained model
    last_stage = logits(PeftModel.from_pretrained(load_base(cfg, seed=0)[0], trained / "adapter"))
    assert (last_stage - merged).abs().max() > 1e-3


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_exits_2_in_one_line_before_any_work_and_loses_nothing(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert "does not exist" in refused(capsys, [str(tmp_path / "missing"), str(out)])
    assert "is not a checkpoint" in refused(capsys, [str(trained / "ledger"), str(out)])
    assert "already is a Hugging Face model folder" in refused(capsys, [str(trained / "merged"), str(out)])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert "is not empty" in refused(capsys, [str(trained), str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "busy").iterdir())) == 1
    (tmp_path / "afile").write_text("x")
    assert "is a file" in refused(capsys, [str(trained), str(tmp_path / "afile" / "out")])  # cannot be made
    assert "inside the checkpoint" in refused(capsys, [str(trained / "checkpoint"), str(trained / "checkpoint" / "x")])
    full = tmp_path / "full"
    shutil.copytree(trained / "checkpoint", full)
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    (full / "config.yaml").write_text(yaml.safe_dump({**cfg, "method": "full"}))
    assert "method: full" in refused(capsys, [str(full), str(out), "--adapter"])
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert "does not exist" in refused(capsys, [f"file://{tmp_path}/missing", str(out)])  # remote storage
    assert "--max-shard-size" in refused(capsys, [str(trained), str(out), "--max-shard-size", "lots"])
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        main([str(trained), str(out), "--dtype", "float16"])
    assert exc.value.code == 2


@pytest.mark.parametrize("offline", ["1", "0"])
def test_push_to_hub_is_refused_offline_or_without_a_token(trained, tmp_path, offline):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE=offline, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "plora_ray.export", str(trained), str(out), "--push-to-hub", "me/m"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("error: --push-to-hub") and "\n" not in err
    assert ("HF_HUB_OFFLINE is set" if offline == "1" else "needs a Hugging Face token") in err
    assert not out.exists()
    assert "not a repo id" in subprocess.run(
        [sys.executable, "-m", "plora_ray.export", str(trained), str(out), "--push-to-hub", "a//b"],
        env=env, capture_output=True, text=True, timeout=120).stderr


# ------------------------------------------------------------------ a sweep on a local Ray cluster

@pytest.fixture(scope="module")
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_sweep_keeps_the_best_checkpoint_and_the_latest_and_prints_the_export_command(tmp_path, capsys,
                                                                                      ray_shutdown, workers):
    """One worker a trial: the trial trains in its Tune function and Tune keeps its checkpoints;
    two: a Ray Train run per trial keeps them (sweep/tune.py). Either way the same two stay."""
    from plora_ray.cli.export import resolve_checkpoint
    from plora_ray.cli.tune import main as tune

    # mode max on the training loss, which falls as it trains: every later checkpoint is worse
    base = {**RUN, "checkpoint_every_steps": 1, "data": {**RUN["data"], "max_steps": 4}}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "best", "metric": "train/loss", "mode": "max",
                                     "searcher": {"type": "grid"}, "num_samples": 1,
                                     "resources": {"workers": workers, "cpus_per_worker": 1},
                                     "base": base, "space": {"lora.rank": {"grid": [2]}}}))
    storage = tmp_path / "sweeps"
    assert tune([str(space), "--storage", str(storage), "--no-report"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("export it: python -m plora_ray.export ")
    printed, export_out = lines[-2].split("python -m plora_ray.export ", 1)[1].split()
    assert lines[-3] == f"checkpoint of the top trial: {printed}"

    (sweep_dir,) = [d for d in storage.iterdir() if d.is_dir() and d.name.startswith("best-")]
    (trial_dir,) = [d for d in sweep_dir.iterdir() if (d / "result.json").is_file()]
    runs = list((storage / "trials").iterdir()) if workers > 1 else []  # the trial's Ray Train run
    assert len(runs) == (workers > 1)
    holder = runs[0] if runs else trial_dir
    kept = {json.loads((d / "state.json").read_text())["step"]: d
            for d in holder.iterdir() if (d / "state.json").is_file()}
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    loss = {r["step"]: r["train/loss"] for r in reports if "checkpoint_score" in r}  # each checkpoint's report
    assert sorted(loss) == [1, 2, 3, 4]
    best = max(loss, key=loss.get)
    assert best <= 2  # the premise: later checkpoints scored worse (keeping the last two would lose it)
    assert sorted(kept) == sorted({best, 4})  # the best and the latest; the worse ones are gone
    assert Path(printed) == kept[best]

    # every way of naming it finds that checkpoint: the sweep, the Tune trial, the Train run
    for name in (sweep_dir, trial_dir, *runs, kept[best]):
        assert resolve_checkpoint(name) == kept[best], name
    out = tmp_path / export_out
    assert main([str(sweep_dir), str(out), "--adapter"]) == 0
    assert json.loads((out / "plora_export.json").read_text())["step"] == best
