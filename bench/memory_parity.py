"""PLoRA's "no additional memory" and its step speed, against the same LoRA run.

    python bench/memory_parity.py [--device cpu|cuda] [--steps 12] [--shape smollm2|tiny]
                                  [--rank-measurement background|checkpoint]

Each method runs in its own fresh process (peak memory is per process): the same random-init
Llama (SmolLM2-135M's shapes by default: hidden 576, 30 layers, 9/3 heads, MLP 1536, bf16
weights), LoRA r 8 on all seven linear layers, the same rows, micro-batch and steps; PLoRA
unloads every 2 steps. Peak memory is the training process's peak RSS during training on
CPU (``ru_maxrss``) and ``torch.cuda.max_memory_allocated`` on a GPU. Step speed is tokens/s
over the steps *without* an unload, after two warm-up steps, per wall second and per CPU
second of the process (all its threads: PLoRA's background rank measurement included; on a
shared machine the wall-clock ratio is noise-bound), and, in a third process holding both
runs, with their steps alternated (:func:`paired`: the load weighs on both alike). Last
line: the ratios.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "smollm2": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128},
}


def config(method: str, args):
    from plora_ray.config.io import build_run_config

    return build_run_config({
        "name": f"mem-{method}", "method": method, "seed": 0,
        "model": {"name_or_path": "tiny", "dtype": "bfloat16", "tiny": SHAPES[args.shape]},
        "lora": {"rank": 8, "alpha": 16,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "plora": {"unload_every_steps": 2, "momentum": 0.0,
                  "rank_measurement": args.rank_measurement},
        "data": {"train_files": ["tiny-dialogues"], "max_length": 256, "micro_batch_size": 4,
                 "gradient_accumulation_steps": 1, "max_steps": args.steps, "shuffle": False},
        "distributed": {"use_gpu": args.device == "cuda"}})


def child(method: str, args) -> dict:
    import torch

    from plora_ray.run.loop import setup, train_step

    cfg = config(method, args)
    device = torch.device(args.device)
    run = setup(cfg, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    speeds, cpu_speeds = [], []
    for index, micro_batches in enumerate(run.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = train_step(run, micro_batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        unloads = run.clock.step(out["samples"]) and run.unloader is not None
        if unloads:
            run.unloader.unload()
        elif index >= 2:
            speeds.append(out["tokens"] / dt)
            cpu_speeds.append(out["tokens"] / cpu)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ledger = run.unloader.ledger if run.unloader is not None else None
    held = ledger.nbytes() if ledger is not None else 0  # factors in host memory (0: on disk)
    return {"peak_bytes": peak, "tokens_per_s": statistics.median(speeds),
            "tokens_per_cpu_s": statistics.median(cpu_speeds), "steps": len(run.steps),
            "ledger_ram": held, "ledger_disk": ledger.disk_bytes() if ledger is not None else 0}


def paired(args) -> dict:
    """LoRA and PLoRA set up in one process, their steps alternated (the order flipped every
    pair), so that a shared machine's load weighs on both alike: the median over pairs of
    LoRA step time / PLoRA step time, for PLoRA steps without an unload after them."""
    import torch

    from plora_ray.run.loop import setup, train_step

    device = torch.device(args.device)
    runs = {m: setup(config(m, args), device=device) for m in ("lora", "plora")}
    ratios, seconds = [], {"lora": [], "plora": []}
    for index in range(len(runs["plora"].steps)):
        times = {}
        for m in (("lora", "plora") if index % 2 == 0 else ("plora", "lora")):
            run = runs[m]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = train_step(run, run.steps[index])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[m] = time.perf_counter() - t0
            unloads = run.clock.step(out["samples"]) and run.unloader is not None
            if unloads:
                run.unloader.unload().ranks
                times["unloaded"] = True
        if index >= 2 and "unloaded" not in times:
            ratios.append(times["lora"] / times["plora"])
            for m in seconds:
                seconds[m].append(times[m])
    return {"paired_ratio": statistics.median(ratios), "pairs": len(ratios),
            "step_s": {m: statistics.median(v) for m, v in seconds.items()}}


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    parser.add_argument("--rank-measurement", default="auto", choices=["auto", "background", "checkpoint"],
                        help="plora.rank_measurement of the PLoRA run")
    parser.add_argument("--child", choices=["lora", "plora", "paired"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(paired(args) if args.child == "paired" else child(args.child, args)))
        return
    results = {}
    for method in ("lora", "plora", "paired"):
        cmd = [sys.executable, __file__, "--child", method, "--device", args.device, "--steps", str(args.steps),
               "--shape", args.shape, "--rank-measurement", args.rank_measurement]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    print(f"machine: {machine(args.device)}, device {args.device}, shape {args.shape}, "
          f"rank measurement {args.rank_measurement}, "
          f"{args.steps} steps of 4 x 256 tokens, LoRA r 8 on 7 modules, bf16 weights")
    print(f"{'method':8} {'peak memory (GB)':>18} {'tokens/s (no unload)':>22} {'tokens/CPU-s (no unload)':>26}")
    for method in ("lora", "plora"):
        r = results[method]
        print(f"{method:8} {r['peak_bytes'] / 1e9:18.3f} {r['tokens_per_s']:22.0f} {r['tokens_per_cpu_s']:26.0f}")
    p = results["plora"]
    print(f"PLoRA ledger: {p['ledger_ram'] / 1e6:.1f} MB in host memory at the end, {p['ledger_disk'] / 1e6:.1f} MB on disk")
    mem = results["plora"]["peak_bytes"] / results["lora"]["peak_bytes"]
    speed = results["plora"]["tokens_per_s"] / results["lora"]["tokens_per_s"]
    cpu = results["plora"]["tokens_per_cpu_s"] / results["lora"]["tokens_per_cpu_s"]
    pair = results["paired"]
    print(f"paired in one process, steps alternated: median step LoRA {pair['step_s']['lora'] * 1e3:.0f} ms, "
          f"PLoRA {pair['step_s']['plora'] * 1e3:.0f} ms; PLoRA / LoRA step speed, median of {pair['pairs']} "
          f"pairs {pair['paired_ratio']:.3f}")
    print(f"PLoRA / LoRA: peak memory {mem:.3f} (target <= 1.01), step tokens/s {speed:.3f} (target >= 0.98; "
          f"per CPU-second {cpu:.3f}; paired {pair['paired_ratio']:.3f}, the least sensitive to a loaded machine)")


if __name__ == "__main__":
    main()
