"""``replicas_identical`` hashes what each rank holds: it fails when one rank's copy differs.

Two real torch.distributed (gloo) processes per case, no Ray: train two steps with an
unload between, check, corrupt rank 1's copy, check again.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from plora_ray.config.io import build_run_config

from gloo_workers import free_port, init_gloo

ENGINES = {"ddp": {"engine": "ddp"}, "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "zero3": {"engine": "deepspeed", "zero_stage": 3}}


def corrupt(run, engine):
    """Change rank 1's copy the way a bug would: without going through the engine."""
    layer = next(iter(run.unloader.layers.values()))
    with torch.no_grad():
        if engine == "ddp":
            layer.get_base_layer().weight.view(-1)[0] += 1.0  # an unloaded backbone weight
        elif engine == "zero2":
            layer.lora_A["default"].weight.view(-1)[0] += 1.0  # module copy, master untouched
        else:
            p = layer.lora_A["default"].weight
            p.ds_tensor.view(-1)[0] += 1.0  # this rank's partition, master untouched


def worker(rank, world, port, engine, out_dir):
    init_gloo(rank, world, port)

    from plora_ray.run.replicas import replicas_identical
    from plora_ray.run.loop import setup, train_step

    cfg = build_run_config({"name": "rep", "plora": {"unload_every_steps": 1, "momentum": 0.1},
                            "optim": {"lr": 1e-2}, "distributed": {"workers": world, **ENGINES[engine]},
                            "data": {"max_length": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                                     "max_steps": 2}})
    run = setup(cfg, rank, world)
    for mb in run.steps:
        out = train_step(run, mb)
        if run.clock.step(out["samples"]):
            run.unloader.unload()
    before = replicas_identical(run)
    if rank == 1:
        corrupt(run, engine)
    after = replicas_identical(run)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"before": before, "after": after, "holds_ledger": run.unloader.ledger is not None,
                   "ranks": run.unloader.ledger.ranks() if run.unloader.ledger else None}, f)
    # leave at once: tearing down a gloo group (DDP's reducer still attached) sometimes hung
    # here; the result is on disk and the process owns nothing else
    os._exit(0)


@pytest.mark.timeout(300)  # two processes: a hang fails this test, not the suite
@pytest.mark.parametrize("engine", list(ENGINES))
def test_replicas_identical_fails_when_one_rank_is_corrupted(tmp_path, engine):
    mp.start_processes(worker, args=(2, free_port(), engine, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert all(r["before"] is True for r in results)
    assert all(r["after"] is False for r in results)


@pytest.mark.timeout(300)
def test_only_rank_0_holds_the_ledger_and_measures_the_rank(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), "ddp", str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["holds_ledger"] for r in results] == [True, False]
    assert results[0]["ranks"] and min(results[0]["ranks"].values()) >= 8  # 2 unloads of rank 8 measured
