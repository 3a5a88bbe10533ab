"""The memory-fit estimate (``plora_ray.run.memory``) against measured peaks of real training steps on the CPU.

    python bench/memory_fit.py [--shapes tiny,smollm2] [--engines ddp,zero2,zero3,zero2-default]
                               [--methods plora,full] [--workers 1] [--steps 3] [--checkpointing both]

Each case runs in a fresh process: ``run.loop.setup`` then ``--steps`` training steps with the
project's own loop (PLoRA unloads every 2 steps), under torch's CPU profiler with
``profile_memory``: the peak of the running sum of every CPU tensor allocation and free from
before the model is built to after the last step (what ``torch.cuda.max_memory_allocated``
counts on a GPU: no allocator cache, no Python objects). Also reported: the process's RSS
high-water mark minus its RSS after the imports (pages touched: a ``torch.empty`` bucket that
is never filled does not count there).

Shapes: ``tiny`` (the built-in random Llama, fp32) and ``smollm2`` (SmolLM2-135M's
architecture, ``run.models.EMBEDDED_CONFIGS``, random weights saved to a temporary directory
with the byte-level tiny tokenizer; bf16, which this CPU runs with AMX). Rows are long
prompt/completion pairs cut at ``data.max_length``, so every micro-batch is full width and
nearly every position labelled, as the estimate assumes. Engines: DDP (``ddp``), DeepSpeed
ZeRO-2/3 with a 5e6-element reduce bucket (``zero2``, ``zero3``: the 5e8 default would hide
the rest of a small model's memory; set through a ``distributed.deepspeed_config`` JSON the
estimate reads, and in the engine's config) and ZeRO-2 with DeepSpeed's default bucket
(``zero2-default``). ``--workers 2`` runs two gloo processes (each measured; the larger peak).
Last lines: estimate / measured per case.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = {"tiny": {"dtype": "float32", "max_length": 128, "micro_batch_size": 4},
          "smollm2": {"dtype": "bfloat16", "max_length": 256, "micro_batch_size": 4}}
SMALL_BUCKET = 5_000_000
WORDS = "the of and to in is was for on that with as by at from his her it an were are which this be or".split()


def data_file(tmp: Path) -> Path:
    """Rows far longer than any max_length here (one token per byte)."""
    import random

    rng, path = random.Random(0), tmp / "long.jsonl"
    with open(path, "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": "go", "completion": " ".join(rng.choice(WORDS) for _ in range(800))}) + "\n")
    return path


def smollm2_dir(tmp: Path, dtype: str) -> Path:
    """SmolLM2-135M's architecture with random weights, saved in ``dtype`` (no cast on load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from plora_ray.run.models import EMBEDDED_CONFIGS, tiny_tokenizer

    out = tmp / f"smollm2-{dtype}"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**EMBEDDED_CONFIGS["smollm2-135m-instruct"]))
        model.to(getattr(torch, dtype)).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
    return out


def run_config(case: dict, tmp: Path):
    from plora_ray.config.schema import RunConfig

    shape = SHAPES[case["shape"]]
    engine = "ddp" if case["engine"] == "ddp" else "deepspeed"
    dist = {"engine": engine, "workers": case["workers"]}
    if engine == "deepspeed":
        dist["zero_stage"] = int(case["engine"][4])
        if not case["engine"].endswith("default"):
            path = tmp / "ds.json"
            path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": SMALL_BUCKET}}))
            dist["deepspeed_config"] = str(path)
    name = "tiny" if case["shape"] == "tiny" else str(smollm2_dir(tmp, shape["dtype"]))
    return RunConfig.model_validate({
        "name": "memfit", "method": case["method"], "seed": 0,
        "model": {"name_or_path": name, "dtype": shape["dtype"], "gradient_checkpointing": case["checkpointing"]},
        "lora": {"rank": 8}, "plora": {"unload_every_steps": 2},
        "data": {"train_files": [str(data_file(tmp))], "max_length": shape["max_length"],
                 "micro_batch_size": shape["micro_batch_size"], "gradient_accumulation_steps": 1,
                 "max_steps": case["steps"], "shuffle": False, "tokenize_cache": False},
        "eval": {"tasks": []}, "distributed": dist})


def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(rank: int, world: int, case: dict, tmp: str, port: int, out: str) -> None:
    """One process of a case: its allocation peak over setup + steps, and its RSS growth."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from plora_ray.run import engines
    from plora_ray.run.loop import setup, train_step

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = run_config(case, Path(tmp))
    if cfg.distributed.engine == "deepspeed" or world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    if cfg.distributed.deepspeed_config:  # the engine's config gets the same bucket as the estimate reads
        original = engines.deepspeed_config

        def with_bucket(*args, **kwargs):
            ds = original(*args, **kwargs)
            ds.setdefault("zero_optimization", {})["reduce_bucket_size"] = SMALL_BUCKET
            return ds
        engines.deepspeed_config = with_bucket
    base = rss()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase:setup"):
            run = setup(cfg, rank, world, torch.device("cpu"))
        ckpt = bool(getattr(run.model, "is_gradient_checkpointing", False))
        step = run.engine.step

        def timed_step():
            with record_function("phase:optimizer step"):
                step()
        run.engine.step = timed_step
        for micro_batches in run.steps:
            with record_function("phase:forward/backward"):
                result = train_step(run, micro_batches)
            if run.clock.step(result["samples"]) and run.unloader is not None:
                with record_function("phase:unload"):
                    run.unloader.unload()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = at = 0
    for t, nbytes in memory:
        current += nbytes
        if current > peak:
            peak, at = current, t
    phases = [(e.start_ns(), e.end_ns(), e.name()[6:]) for e in events if e.name().startswith("phase:")]
    inside = [p for p in phases if p[0] <= at <= p[1]]
    phase = max(inside)[2] if inside else "?"  # the innermost (latest started)
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": peak, "rss": hwm - base, "checkpointing": ckpt,
                                                         "phase": phase}))


def child(case: dict, tmp: str) -> dict:
    import socket

    import torch.multiprocessing as mp

    from plora_ray.run.memory import estimate

    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if case["workers"] == 1:
            measure(0, 1, case, tmp, port, out)
        else:
            mp.spawn(measure, args=(case["workers"], case, tmp, port, out), nprocs=case["workers"])
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    est = estimate(run_config(case, Path(tmp)))
    parts = {k: getattr(est, k) for k in ("weights", "states", "grads", "activations", "logits", "buffers",
                                          "between_steps")}
    top = max(ranks, key=lambda r: r["peak"])
    return {**case, "measured": top["peak"], "phase": top["phase"], "rss": max(r["rss"] for r in ranks),
            "checkpointing_on": all(r["checkpointing"] for r in ranks), "estimate": est.total, "parts": parts}


def machine() -> str:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    fast = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(fast) or 'no AVX-512'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,smollm2")
    parser.add_argument("--engines", default="ddp,zero2,zero3,zero2-default")
    parser.add_argument("--methods", default="plora,full")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", default="off", choices=["off", "on", "both"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, tmp = json.loads(args.child)
        print("RESULT " + json.dumps(child(case, tmp)))
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    print(f"# {machine()}; torch CPU allocations (profiler), {args.steps} steps, {args.workers} worker(s)")
    print(f"{'shape':8} {'engine':14} {'method':6} {'ckpt':5} {'estimate MiB':>12} {'measured MiB':>12} "
          f"{'RSS MiB':>8} {'est/meas':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for engine in args.engines.split(","):
                for method in args.methods.split(","):
                    for ckpt in ckpts:
                        case = {"shape": shape, "engine": engine, "method": method, "checkpointing": ckpt,
                                "workers": args.workers, "steps": args.steps}
                        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([case, tmp])],
                                              env=env, capture_output=True, text=True, cwd=ROOT)
                        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                        if line is None:
                            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                            print(f"{shape:8} {engine:14} {method:6} {str(ckpt):5} failed: {tail[:150]}")
                            continue
                        r = json.loads(line[7:])
                        mark = "" if r["checkpointing_on"] == ckpt else " (checkpointing not applied by the run)"
                        print(f"{shape:8} {engine:14} {method:6} {str(ckpt):5} {r['estimate'] / 2**20:12.1f} "
                              f"{r['measured'] / 2**20:12.1f} {r['rss'] / 2**20:8.1f} "
                              f"{r['estimate'] / r['measured']:8.2f}  peak in {r['phase']}{mark}", flush=True)
                        print("   parts MiB: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["parts"].items()),
                              flush=True)


if __name__ == "__main__":
    main()
