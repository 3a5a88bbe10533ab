"""A worker killed for real restarts its group from a ledger-only checkpoint, and the run then
matches an uninterrupted one bit for bit (2 workers, ZeRO-2, bf16 backbone, dropout, linear LR)."""

import json
import os
import signal
import uuid

import pytest
from safetensors.torch import load_file

import faults
from plora_ray.config.io import build_run_config
from plora_ray.ray.local import LOCAL_SETTINGS
from plora_ray.ray.trainer import trainer_for


@pytest.fixture
def ray_with_fault(tmp_path):
    """A local cluster whose workers kill rank 1 after its step 5, once (tests/faults.py)."""
    import ray
    from ray import cloudpickle

    marker = tmp_path / "killed"

    def hook():  # run as each worker process starts; shipped by value, tests/ is not on its path
        def kill_rank_1_at_step_5_once(rec, rank):
            if rec["step"] == 5 and rank == 1 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        faults.install(kill_rank_1_at_step_5_once)

    cloudpickle.register_pickle_by_value(faults)
    ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=1 << 30, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": dict(LOCAL_SETTINGS), "worker_process_setup_hook": hook})
    yield marker
    ray.shutdown()
    # Ray writes the hook's key into the env_vars dict it is given: had it been the library's
    # own LOCAL_SETTINGS, every later ray.init in this process would ask for a dead hook
    assert not any("SETUP_HOOK" in k for k in LOCAL_SETTINGS), LOCAL_SETTINGS


def final_checkpoint(cfg, tmp_path):
    result = trainer_for(cfg, str(tmp_path / "ray"), f"l-{uuid.uuid4().hex[:8]}").fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        files = sorted(os.listdir(d))
        tensors = {"trainable": load_file(os.path.join(d, "trainable.safetensors")),
                   "ledger": {f"{shard}/{k}": v for shard in sorted(os.listdir(os.path.join(d, "ledger")))
                              for k, v in load_file(os.path.join(d, "ledger", shard)).items()}}
        state = json.loads(open(os.path.join(d, "state.json")).read())
    return files, tensors, state


def test_killed_worker_resumes_from_a_ledger_checkpoint_bit_exactly(ray_with_fault, tmp_path):
    marker = ray_with_fault
    cfg = build_run_config({
        "name": "ledger", "seed": 0, "checkpoint_every_steps": 3,
        "model": {"dtype": "bfloat16"}, "plora": {"unload_every_steps": 2, "momentum": 0.1},
        "lora": {"dropout": 0.1}, "optim": {"lr": 1e-2, "scheduler": "linear"},
        "data": {"max_length": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 6},
        "distributed": {"workers": 2, "engine": "deepspeed", "zero_stage": 2, "max_failures": 1}})
    # rank 1 dies at step 5: the group restarts from the step-3 checkpoint
    files, resumed, state = final_checkpoint(cfg, tmp_path)
    assert marker.exists()  # the worker really died
    assert "backbone.safetensors" not in files and state["backbone"] == "ledger"
    assert [h["step"] for h in state["history"]] == list(range(1, 7))  # no step lost or repeated
    assert [e["step"] for e in state["unloads"]] == [2, 4, 6]
    _, clean, clean_state = final_checkpoint(cfg, tmp_path)  # the marker is there: no fault
    assert [h["loss"] for h in state["history"]] == [h["loss"] for h in clean_state["history"]]
    assert [e["ranks"] for e in state["unloads"]] == [e["ranks"] for e in clean_state["unloads"]]
    for kind in ("trainable", "ledger"):
        assert resumed[kind].keys() == clean[kind].keys()
        for name, t in clean[kind].items():
            assert t.equal(resumed[kind][name]), (kind, name)
