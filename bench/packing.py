"""Tokens/s of ``data.packing`` against padded micro-batches, same run, same rows.

    python bench/packing.py [--steps 8] [--warmup 1] [--micro 8] [--max-length 512]
                            [--model smollm2-135m-instruct|tiny]

SmolLM2-135M-Instruct (the embedded model, ``model.dtype: auto``), LoRA r 8 on all seven linear
modules, the embedded mix's dialogues as they are (mixed lengths: a padded micro-batch is as wide
as its longest row), micro-batch ``--micro``, one process. Three configurations, interleaved step
by step in this process (a machine whose load changes slows all alike): padded (shuffled),
padded + ``data.group_by_length``, and ``data.packing`` (the same shuffled micro-batches as the
padded run, each packed into rows of ``--max-length`` tokens with per-example position ids).
The packed and the padded run see the same examples in every step, so their losses must agree
(printed). tokens/s counts the examples' tokens (no padding); the first ``--warmup`` steps are
not timed; figures are medians over steps; ratios are medians of per-step ratios.
``--model tiny``: plora_ray's built-in random Llama instead: a check that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = "smollm2-135m-instruct"


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return f"{name} ({isa}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"],
                    help="bench/RESULTS.md's figures: the default; tiny: plora_ray's built-in random "
                         "Llama (a quick check that the script runs)")
    args = ap.parse_args()

    from plora_ray.assets.mix import build_embedded_mix
    from plora_ray.config.io import build_run_config
    from plora_ray.run.loop import setup, train_step

    tmp = tempfile.mkdtemp()
    rows = os.path.join(tmp, "rows.jsonl")
    with open(rows, "w") as f:
        f.writelines(json.dumps({"messages": r["messages"]}) + "\n" for r in build_embedded_mix("embedded-mix-small"))

    def make(**data):
        return setup(build_run_config({
            "name": "bench", "method": "lora", "seed": 0, "output_dir": tmp,
            "model": {"name_or_path": args.model, "dtype": "auto"},
            "lora": {"rank": 8, "target_modules": TARGETS},
            "data": {"train_files": [rows], "max_length": args.max_length, "micro_batch_size": args.micro,
                     "gradient_accumulation_steps": 1, **data}}))

    runs = {"padded": make(), "grouped": make(group_by_length=True), "packed": make(packing=True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, list[int]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(args.warmup + args.steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = train_step(run, run.steps[step])
            dt = time.perf_counter() - t0
            losses[name].append(out["loss"])
            if step >= args.warmup:
                times[name].append(dt)
                tokens[name].append(out["tokens"])
    print(f"# {cpu()}, dtype {runs['padded'].cfg.model.dtype}, micro-batch {args.micro}, "
          f"max_length {args.max_length}, {args.steps} timed steps")
    for name in runs:
        rate = statistics.median(t / s for t, s in zip(tokens[name], times[name]))
        print(f"{name:8s} {rate:8.0f} tokens/s  step {statistics.median(times[name]):.2f} s")
    base = [t / s for t, s in zip(tokens["padded"], times["padded"])]
    for name in ("grouped", "packed"):
        ratio = statistics.median(t / s / b for t, s, b in zip(tokens[name], times[name], base))
        print(f"{name} / padded tokens/s: {ratio:.2f}x")
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses["packed"], losses["padded"]))
    print(f"packed vs padded loss, largest relative difference over {len(losses['packed'])} steps: {gap:.1e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
