"""The README's first command, end to end: unloads with growing rank, outputs that rebuild W."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from plora_ray.config.io import load_run_config
from plora_ray.run.models import tiny_model, tiny_tokenizer
from plora_ray.ledger.store import UnloadLedger

ROOT = Path(__file__).resolve().parents[1]


def test_example_run_unloads_with_growing_rank_and_outputs_rebuild_weights(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "plora_ray.train", str(ROOT / "examples/tiny.yaml"),
                           "--output", str(out), "--set", "data.epochs=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    ranks = [float(r) for r in re.findall(r"accumulated rank mean ([0-9.]+)", text)]
    assert len(ranks) >= 3 and all(b > a for a, b in zip(ranks, ranks[1:]))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["unloads"] == len(ranks) and summary["final_loss"] < summary["first_loss"]
    events = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "unload" for e in events) == len(ranks)

    # W_T = W_0 + ledger, and the merged weights = W_T + the live adapter's s*B*A
    cfg = load_run_config(ROOT / "examples/tiny.yaml")
    w0 = tiny_model(cfg.model, len(tiny_tokenizer()), cfg.seed).state_dict()
    ledger = UnloadLedger.load(out / "ledger")
    merged = load_file(str(out / "merged" / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    scale = cfg.lora.alpha / cfg.lora.rank
    assert len(ledger.factors) == 2 * 7
    for name in ledger.factors:
        key = f"{name}.weight"
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        expect = ledger.rebuild(name, w0[key]) + scale * b @ a
        assert torch.allclose(merged[key], expect, rtol=0, atol=1e-5 * expect.abs().max())
    assert torch.equal(merged["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])


def test_local_model_directory_trains(tmp_path, tiny_cfg):
    from plora_ray.run.loop import fit, setup

    cfg = tiny_cfg()
    model_dir = tmp_path / "model"
    tiny_model(cfg.model, len(tiny_tokenizer()), 0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    run = fit(setup(tiny_cfg(model={"name_or_path": str(model_dir)}, data={"max_steps": 4})), progress=False)
    assert len(run.unloads) == 2 and run.unloads[-1].mean_rank > run.unloads[0].mean_rank


def test_run_times_its_phases(tiny_cfg):
    from plora_ray.run.loop import fit, setup

    """bench/sweep_efficiency.py reads these (as MLflow ``phase/*_s``): every phase a run went
    through has a positive wall time, and the steps are timed apart from evaluation."""
    cfg = tiny_cfg(data={"max_steps": 4}, checkpoint_every_steps=2, eval={"heldout": {"fraction": 0.1, "limit": 4}})
    run = fit(setup(cfg), on_checkpoint=lambda run, final, scores: time.sleep(0.2), progress=False)
    assert {"model_load", "tokenise", "engine", "steps", "unload", "evaluation", "checkpoint"} <= run.timings.keys()
    assert all(v > 0 for v in run.timings.values())
    assert len(run.evals) == 2 and run.timings["checkpoint"] >= 0.4  # the callbacks, evaluation apart


def test_console_eval_line_keeps_task_scores_and_leaves_mmlu_categories_to_mlflow(tiny_cfg, capsys):
    """The checkpoint's console line: each task's score with its standard error; MMLU's
    categories (a few items each at a sweep's item counts) only in the run's metrics."""
    from plora_ray.run.loop import fit, setup

    cfg = tiny_cfg(data={"max_steps": 2}, eval={"tasks": ["mmlu"], "limit": 8})
    run = fit(setup(cfg), progress=True)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("eval at step 2:"))
    assert re.search(r"mmlu/acc [0-9.]+ ± [0-9.]+", line)
    assert "mmlu/stem" not in line and "humanities" not in line
    assert any(k.startswith("eval/mmlu/") and k != "eval/mmlu/acc" and not k.endswith(("_stderr", "/n"))
               for k in run.evals[-1])  # the categories are still scored and recorded
