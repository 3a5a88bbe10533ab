"""The run directory of a one-process run: checkpoints that --resume continues, a merged
Hugging Face model directory that lm-eval loads as it is, a note on the PLoRA adapter."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from plora_ray.run.loop import fit, setup
from plora_ray.run.rundir import restore_run, write_run_dir
from plora_ray.cli.train import main

ROOT = Path(__file__).resolve().parents[1]
# (context, continuation) as lm-eval scores them: contexts end without whitespace (lm-eval
# moves trailing whitespace into the continuation)
PAIRS = [("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant", "\n5<|im_end|>"),
         ("12 + 7 =", " 19"), ("The answer is", " 42.")]


def write_config(tmp_path, **top):
    cfg = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())
    cfg["data"].update({"max_steps": 4, "max_length": 96})
    cfg["plora"] = {"unload_every_steps": 2, "momentum": 0.1}
    cfg.update(top)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "event" not in l]


def test_resume_continues_a_one_process_run_from_its_checkpoint(tmp_path):
    cfg = write_config(tmp_path, checkpoint_every_steps=2, save_merged=False)
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([str(cfg), "--output", str(whole)]) == 0
    assert main([str(cfg), "--output", str(part), "--set", "data.max_steps=2"]) == 0
    assert json.loads((part / "checkpoint" / "state.json").read_text())["step"] == 2
    assert main([str(cfg), "--output", str(part), "--resume"]) == 0
    assert [h["step"] for h in history(part)] == [1, 2, 3, 4]
    assert [h["loss"] for h in history(part)] == pytest.approx([h["loss"] for h in history(whole)], rel=1e-6)


def test_resume_without_a_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main([str(write_config(tmp_path)), "--output", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume:") and "holds no run" in err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run's directory, and log-likelihoods the in-memory (unmerged) model gives."""
    from plora_ray.config.io import load_run_config

    tmp = tmp_path_factory.mktemp("run")
    run = fit(setup(load_run_config(write_config(tmp))), progress=False)
    run.model.eval()
    tok = run.tokenizer
    lls = []
    with torch.no_grad():
        for ctx, cont in PAIRS:
            c, w = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
            logits = run.model(input_ids=torch.tensor([w])).logits[0].log_softmax(-1)
            lls.append(sum(logits[i - 1, w[i]].item() for i in range(len(c), len(w))))
    write_run_dir(run, tmp / "out")
    return tmp / "out", lls


def test_merged_directory_loads_in_lm_eval_and_scores_like_the_trained_model(trained):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    out, expected = trained
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in (out / "merged").iterdir()}
    lm = HFLM(pretrained=str(out / "merged"), device="cpu", batch_size=2)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]
    assert got == pytest.approx(expected, abs=1e-4)


def test_plora_adapter_is_marked_as_not_the_trained_model(trained):
    out, _ = trained
    note = (out / "adapter" / "README.txt").read_text()
    assert "only the last stage" in note and "merged/" in note
    assert json.loads((out / "summary.json").read_text())["adapter_note"] == note.strip()


def test_checkpoint_alone_rebuilds_the_merged_model(tmp_path):
    """evaluate's path for a checkpoint (a sweep's best, or a run without merged/)."""
    from safetensors.torch import load_file

    from plora_ray.run.rundir import merged_model

    assert main([str(write_config(tmp_path)), "--output", str(tmp_path / "r")]) == 0
    saved = load_file(str(tmp_path / "r" / "merged" / "model.safetensors"))
    rebuilt = merged_model(restore_run(tmp_path / "r" / "checkpoint")).state_dict()
    assert saved.keys() == rebuilt.keys()
    for k, v in saved.items():
        assert torch.equal(v, rebuilt[k]), k
