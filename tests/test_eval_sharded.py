"""Evaluation sharded over a real 2-process gloo group equals 1-process evaluation item by item,
and under lockstep (ZeRO-3) every rank runs the same forward calls.

ZeRO-3 is emulated: in lockstep mode each forward pass of the model joins an ``all_reduce``,
as ZeRO-3's parameter all-gathers do, so a rank that ran fewer forwards than the others would
meet a different collective and fail (or time out) instead of passing."""

from __future__ import annotations

import os
import pickle
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from plora_ray.config.schema import ModelConfig

# uneven shares on 2 ranks (ARC 2/1 items with 4+4 vs 3 choices, GSM8K 2/1 generate calls at
# batch size 1, held-out 3/2 batches) so the lockstep padding is exercised
MMLU = [dict(question=f"Question {i}?", subject=s, choices=["w", "x", "y", "z"], answer=i % 4)
        for i, s in enumerate(["anatomy", "anatomy", "philosophy", "econometrics"])]
ARC = [
    dict(id="a1", question="Which is a mammal?", choices=["dog", "trout", "eagle", "a long answer"],
         labels=list("ABCD"), gold=0),
    dict(id="a2", question="Water boils at?", choices=["100 C", "0 C", "50 degrees"], labels=["1", "2", "3"], gold=0),
    dict(id="a3", question="Plants make food by?", choices=["photosynthesis", "eating", "digging", "sleep"],
         labels=list("ABCD"), gold=0),
]
GSM = [dict(question="Tom has 3 apples and buys 2 more. How many?", answer="#### 5"),
       dict(question="What is 10 minus 4?", answer="#### 6"),
       dict(question="A train goes 60 miles per hour for 2 hours. How far?", answer="#### 120")]
KW = dict(items={"mmlu": MMLU, "arc_easy": ARC, "gsm8k": GSM}, batch_size=2, max_new_tokens=6,
          prompt_style="plain")


def _setup():
    from plora_ray.evaluation import load_heldout
    from plora_ray.run.models import load_base

    torch.set_num_threads(1)
    model, tok = load_base(ModelConfig())
    model.eval()
    return model, tok, load_heldout(["tiny-dialogues"], tok, 40)[:5]


def _evaluate(model, tok, heldout, **kw):
    from plora_ray.evaluation import evaluate

    # batch size 1 for generation: 2 vs 1 generate calls on the two ranks
    gen = evaluate(model, tok, ["gsm8k"], **dict(KW, batch_size=1), **kw)
    rest = evaluate(model, tok, ["mmlu", "arc_easy"], heldout=heldout, **KW, **kw)
    return {"metrics": {**rest, **gen}, "samples": {**rest.samples, **gen.samples}}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model, tok, heldout = _setup()
    out = {"plain": _evaluate(model, tok, heldout, rank=rank, world=world)}
    calls = []

    def zero3_like(module, args):  # every forward is a collective, as under ZeRO-3
        calls.append(1)
        dist.all_reduce(torch.ones(1))

    handle = model.register_forward_pre_hook(zero3_like)
    out["lockstep"] = _evaluate(model, tok, heldout, rank=rank, world=world, lockstep=True)
    handle.remove()
    out["forwards"] = len(calls)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    model, tok, heldout = _setup()
    return _evaluate(model, tok, heldout)


def _assert_same_items(a: dict, b: dict) -> None:
    assert a["samples"].keys() == b["samples"].keys() == {"mmlu", "arc_easy", "gsm8k", "heldout"}
    for task in a["samples"]:
        for x, y in zip(a["samples"][task], b["samples"][task], strict=True):
            assert x.keys() == y.keys() and x["id"] == y["id"], task
            for key in x:
                if key in ("lls", "loss"):
                    assert x[key] == pytest.approx(y[key], abs=1e-5), (task, key)
                else:
                    assert x[key] == y[key], (task, key)
    assert a["metrics"].keys() == b["metrics"].keys()
    for key, value in a["metrics"].items():
        assert value == pytest.approx(b["metrics"][key], abs=1e-5, nan_ok=True), key


@pytest.mark.parametrize("mode", ["plain", "lockstep"])
def test_two_ranks_equal_one_process_item_by_item(sharded, single, mode):
    """Both ranks return the complete result, in item order, equal to one process's."""
    for rank in (0, 1):
        _assert_same_items(sharded[rank][mode], single)


def test_lockstep_ranks_run_the_same_forward_calls(sharded):
    assert sharded[0]["forwards"] == sharded[1]["forwards"] > 0


def test_world_without_process_group_is_refused():
    from plora_ray.evaluation import Shard

    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        Shard(0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        Shard(2, 2)
