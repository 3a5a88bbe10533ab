"""Ray Train workers on a real local Ray cluster: DDP and DeepSpeed ZeRO-2/3 on CPU (gloo)."""

import os
import uuid

import pytest
import torch
from safetensors.torch import load_file

from plora_ray.checkpoint import read_backbone, save_checkpoint
from plora_ray.config import build_run_config
from plora_ray.distributed import FAULT_STEP_ENV, ensure_ray, trainer_for
from plora_ray.train import fit, setup

ENGINES = {
    "ddp": {"engine": "ddp"},
    "zero2": {"engine": "deepspeed", "zero_stage": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def run_config(workers=2, **sections):
    data = {"name": "dist", "seed": 0, "plora": {"unload_every_samples": 16, "momentum": 0.1,
                                                  "measure_output_change": True},
            "optim": {"lr": 1e-2},
            "data": {"max_length": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_steps": 8},
            "distributed": {"workers": workers}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return build_run_config(data)


def ray_fit(cfg, tmp_path):
    result = trainer_for(cfg, str(tmp_path / "ray"), f"t-{uuid.uuid4().hex[:8]}").fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        files = {"trainable": load_file(os.path.join(d, "trainable.safetensors")),
                 "backbone": read_backbone(setup(one_process(cfg)), d)}  # W_0 + the ledger
        state = __import__("json").loads(open(os.path.join(d, "state.json")).read())
    return result, files, state


def one_process(cfg):
    """The same global batches in one process: micro-batches x (accumulation x workers)."""
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"gradient_accumulation_steps":
                                            cfg.data.gradient_accumulation_steps * cfg.distributed.workers}),
        "distributed": cfg.distributed.model_copy(update={"workers": 1, "engine": "ddp"})})


def single_process(cfg, tmp_path):
    run = fit(setup(one_process(cfg)), progress=False)
    d = save_checkpoint(run, tmp_path / "single")
    return run, {"trainable": load_file(str(d / "trainable.safetensors")),
                 "backbone": read_backbone(setup(one_process(cfg)), d)}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_workers_match_single_process_after_several_unloads(ray_cluster, tmp_path, engine):
    cfg = run_config(distributed=ENGINES[engine])
    result, files, state = ray_fit(cfg, tmp_path)
    assert result.metrics["replicas_identical"] is True  # both ranks hold the same weights
    assert len(state["unloads"]) == 4 and state["unloads"][-1]["samples"] == 64
    for e in state["unloads"]:  # preserve rule: outputs unchanged across every unload
        assert e["output_change"] < 1e-5
    run, single = single_process(cfg, tmp_path)
    assert [h["loss"] for h in state["history"]] == pytest.approx([h["loss"] for h in run.history], rel=1e-5)
    # the merged weights W + s*B*A (what the model computes) equal the one-process run
    assert files["backbone"].keys() == single["backbone"].keys()
    worst_merged = max(relative(merged(files, k), merged(single, k)) for k in single["backbone"])
    worst_factor = max(relative(files["trainable"][k], v) for k, v in single["trainable"].items())
    print(f"{engine}: merged weights {worst_merged:.1e}, LoRA factors {worst_factor:.1e} relative to one process")
    # DDP and ZeRO-2 are bit-identical to one process. ZeRO-3 (measured: 1.5e-5 on the merged
    # weights, 6e-5 on one B, after 4 unloads at lr 1e-2) drifts only when the LoRA optimizer
    # state is reset at unloads (with optimizer_on_unload=keep: 9e-7): not yet explained.
    tol = 1e-4 if engine == "zero3" else 1e-5
    assert worst_merged < tol and worst_factor < 10 * tol


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def merged(files, backbone_key, scale=16 / 8):
    prefix = backbone_key.removesuffix(".base_layer.weight")
    a = files["trainable"][f"{prefix}.lora_A.default.weight"]
    b = files["trainable"][f"{prefix}.lora_B.default.weight"]
    return files["backbone"][backbone_key].double() + scale * (b.double() @ a.double())


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_master_copy_does_not_undo_the_reinit(ray_cluster, tmp_path, engine):
    """One step after an m=0 unload, |B| is that of one Adam step from zero (~ lr * sqrt(n)),
    not the old B written back from DeepSpeed's fp32 master copy."""
    lr = 1e-3
    cfg = run_config(distributed=ENGINES[engine], checkpoint_every_steps=3, optim={"lr": lr},
                     plora={"unload_every_samples": None, "unload_every_steps": 2, "momentum": 0.0,
                            "measure_output_change": False},
                     data={"max_steps": 3})
    _, files, state = ray_fit(cfg, tmp_path)
    assert [e["step"] for e in state["unloads"]] == [2]
    for name, b in files["trainable"].items():
        if "lora_B" in name:
            assert b.norm().item() == pytest.approx(lr * b.numel() ** 0.5, rel=0.05), name


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted(ray_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_STEP_ENV, f"6:1:{marker}")  # rank 1 SIGKILLs itself at step 6, once
    cfg = run_config(checkpoint_every_steps=4, distributed={"max_failures": 1},
                     optim={"lr": 1e-2, "scheduler": "linear"}, lora={"dropout": 0.1})
    result, files, state = ray_fit(cfg, tmp_path)
    assert marker.exists()  # the worker really died
    steps = [h["step"] for h in state["history"]]
    assert steps == list(range(1, 9))  # resumed at step 4, no step lost or repeated
    assert [e["step"] for e in state["unloads"]] == [2, 4, 6, 8]
    monkeypatch.delenv(FAULT_STEP_ENV)
    _, _, clean = ray_fit(cfg, tmp_path)
    assert [h["loss"] for h in state["history"]] == pytest.approx([h["loss"] for h in clean["history"]], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nccl, bf16 ZeRO on GPU)")
def test_gpu_bf16_zero2_nccl(ray_cluster, tmp_path):
    n = torch.cuda.device_count()
    cfg = run_config(workers=n, model={"dtype": "bfloat16"},
                     distributed={"engine": "deepspeed", "zero_stage": 2, "use_gpu": True})
    result, _, state = ray_fit(cfg, tmp_path)
    assert result.metrics["replicas_identical"] is True
    assert all(e["output_change"] < 2e-2 for e in state["unloads"])  # bf16 rounding of W
