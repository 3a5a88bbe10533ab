"""Ray Train workers on a real local Ray cluster: DDP and DeepSpeed ZeRO-2/3 on CPU (gloo)."""

import os
import uuid

import pytest
import torch
from safetensors.torch import load_file

from plora_ray.run.checkpoint import read_backbone, save_checkpoint
from plora_ray.config.io import build_run_config
from plora_ray.ray.driver import run_distributed
from plora_ray.ray.local import ensure_ray
from plora_ray.ray.trainer import trainer_for
from plora_ray.run.loop import fit, setup

ENGINES = {
    "ddp": {"engine": "ddp"},
    "zero2": {"engine": "deepspeed", "zero_stage": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3},
    # a user's DeepSpeed JSON ("auto" values, overlap_comm, partitioned weights) drives ZeRO-3
    "zero3-json": {"engine": "deepspeed", "zero_stage": 3,
                   "deepspeed_config": os.path.join(os.path.dirname(__file__), "..", "examples", "deepspeed_zero3.json")},
}


SETTINGS = ("RAY_AUTH_MODE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's local cluster, started as the CLI starts one; yields this process's Ray
    settings before and after (RAY_AUTH_MODE unset for the start, as for a user)."""
    import ray

    auth = os.environ.pop("RAY_AUTH_MODE", None)
    try:
        before = {k: os.environ.get(k) for k in SETTINGS}
        ensure_ray(num_cpus=2)
        after = {k: os.environ.get(k) for k in SETTINGS}
    finally:
        if auth is not None:
            os.environ["RAY_AUTH_MODE"] = auth
    yield before, after
    ray.shutdown()


def test_starting_a_local_cluster_leaves_the_environment_as_it_was(ray_cluster):
    import ray

    before, after = ray_cluster
    assert before == after == {k: None for k in SETTINGS}

    @ray.remote
    def seen():
        return {k: os.environ.get(k) for k in SETTINGS}

    # ...while the cluster's own processes run without token auth, poll fast and watch for no
    # preemption (one node: this machine)
    assert ray.get(seen.remote()) == {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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
    tol = 1e-4 if engine.startswith("zero3") else 1e-5
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


def test_ray_run_writes_the_run_directory_a_one_process_run_writes(ray_cluster, tmp_path):
    from plora_ray.run.rundir import load_model
    from plora_ray.run.rundir import save_run_checkpoint, write_run_dir

    cfg = run_config(data={"max_steps": 2})
    summary = run_distributed(cfg, tmp_path / "ray_run", "cli-layout")
    assert summary["steps"] == 2 and summary["replicas_identical"] is True and summary["workers"] == 2
    # Ray Train's actors on the local cluster: no preemption watcher (ensure_ray's settings)
    from plora_ray.ray.placement import actor_table

    classes = {a.class_name for a in actor_table()}
    assert "TrainController" in classes and "PreemptionWatcher" not in classes, classes
    # a sweep's "best": a checkpoint directory (Ray also writes checkpoint_manager_snapshot.json there)
    ray_ckpt = next(p for p in (tmp_path / "ray_run" / "ray" / "cli-layout").glob("checkpoint_*") if p.is_dir())
    # the same global batch in one process (2 micro-batches a step): the same unloads, so the same files
    single = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"workers": 1}),
                                    "data": cfg.data.model_copy(update={"gradient_accumulation_steps": 2})})
    one = fit(setup(single),
              on_checkpoint=lambda run, final, scores: save_run_checkpoint(run, tmp_path / "one" / "checkpoint"),
              progress=False)
    write_run_dir(one, tmp_path / "one")

    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.relative_to(d).parts[0] != "ray")

    assert files(tmp_path / "ray_run") == files(tmp_path / "one")
    merged, _ = load_model(str(tmp_path / "ray_run"))
    from_ray_ckpt, _ = load_model(str(ray_ckpt))
    for (name, a), b in zip(merged.state_dict().items(), from_ray_ckpt.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nccl, bf16 ZeRO on GPU)")
def test_gpu_bf16_zero2_nccl(ray_cluster, tmp_path):
    n = torch.cuda.device_count()
    cfg = run_config(workers=n, model={"dtype": "bfloat16"},
                     distributed={"engine": "deepspeed", "zero_stage": 2, "use_gpu": True})
    result, _, state = ray_fit(cfg, tmp_path)
    assert result.metrics["replicas_identical"] is True
    assert all(e["output_change"] < 2e-2 for e in state["unloads"])  # bf16 rounding of W
