"""GPU paths (skipped without CUDA): one process on a GPU in bf16, through the CLI.

The Ray Train + nccl + DeepSpeed ZeRO-2 case is ``test_distributed.test_gpu_bf16_zero2_nccl``.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from plora_ray.cli.train import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def write_config(tmp_path, **data):
    cfg = {"name": "gpu", "method": "plora", "seed": 0, "checkpoint_every_steps": 3, "log_every_steps": 100,
           "model": {"name_or_path": "tiny", "dtype": "bfloat16"},
           "plora": {"unload_every_steps": 2, "momentum": 0.1, "measure_output_change": True},
           "optim": {"lr": 1e-2},
           "data": {"train_files": ["tiny-dialogues"], "max_length": 64, "micro_batch_size": 4,
                    "gradient_accumulation_steps": 2, "max_steps": 6},
           "eval": {"heldout": {"fraction": 0.1}},
           "distributed": {"use_gpu": True}}
    cfg.update(data)
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_one_process_on_a_gpu_trains_unloads_and_resumes_bit_exactly(tmp_path):
    config = write_config(tmp_path)
    assert main([str(config), "--output", str(tmp_path / "full")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    assert [m["step"] for m in steps] == list(range(1, 7)) and steps[-1]["loss"] < steps[0]["loss"]
    unloads = [m for m in metrics if m.get("event") == "unload"]
    assert [u["step"] for u in unloads] == [2, 4, 6] and all(u["output_change"] < 2e-2 for u in unloads)
    evals = [m for m in metrics if m.get("event") == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and all("eval/heldout/loss" in e for e in evals)

    # interrupted after the step-3 checkpoint, then resumed: the same weights, bit for bit
    half = write_config(tmp_path, data={"train_files": ["tiny-dialogues"], "max_length": 64, "micro_batch_size": 4,
                                        "gradient_accumulation_steps": 2, "max_steps": 6})
    assert main([str(half), "--output", str(tmp_path / "resumed"), "--set", "data.max_steps=3"]) == 0
    assert main([str(half), "--output", str(tmp_path / "resumed"), "--resume"]) == 0
    for name in ("trainable", "ledger"):
        a = load_file(str(tmp_path / "full" / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "checkpoint" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
