"""A real pretrained model (SmolLM2-135M-Instruct, embedded) trains through the same code."""

import torch

from plora_ray.config.io import build_run_config
from plora_ray.run.loop import fit, setup


def test_smollm2_plora_on_embedded_mix_small_trains_and_unloads():
    cfg = build_run_config({
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "auto"},  # bf16 where it is fast
        "plora": {"unload_every_steps": 1, "momentum": 0.1},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"train_files": ["embedded-mix-small"], "max_length": 96, "micro_batch_size": 2,
                 "gradient_accumulation_steps": 1, "max_steps": 2},
        "eval": {"heldout": {"limit": 16}},  # the final held-out loss on 16 of the 319 problems
    })
    run = fit(setup(cfg), progress=False)
    assert len(run.examples) > 100  # long prompts truncated before the reply are dropped
    assert len(run.unloads) == 2 and run.unloads[-1].mean_rank > run.unloads[0].mean_rank
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history)
    assert run.history[0]["loss"] < 5  # a pretrained chat model, not a random one
