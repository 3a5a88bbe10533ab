"""What an unload costs against a training step, and bf16 against fp32 steps.

    python bench/unload_cost.py [--hidden 256] [--layers 4] [--steps 10]

Prints, for one model size, the median time of a training step (fp32 and bf16 backbone)
and of an unload (merge + ledger + rank + reset), and the ratios
unload / step and fp32 step / bf16 step, all measured in this process.
"""

import argparse
import statistics
import time

import torch

from plora_ray.config import build_run_config
from plora_ray.train import setup, train_step


def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure(dtype, args):
    cfg = build_run_config({
        "plora": {"unload_every_steps": 10**9},
        "model": {"dtype": dtype, "tiny": {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                                            "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "intermediate_size": 4 * args.hidden}},
        "data": {"max_length": 128, "micro_batch_size": 8, "gradient_accumulation_steps": 1, "epochs": 3},
    })
    run = setup(cfg)
    steps = iter(run.steps)
    train_step(run, next(steps))  # warm-up
    step = timed(lambda: train_step(run, next(steps)), args.steps)
    unload = timed(run.unloader.unload, args.steps)
    return step, unload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    step32, unload32 = measure("float32", args)
    step16, unload16 = measure("bfloat16", args)
    print(f"model: tiny llama hidden {args.hidden}, {args.layers} layers, micro-batch 8 x 128 tokens")
    print(f"fp32 step {step32 * 1e3:.1f} ms, unload {unload32 * 1e3:.1f} ms -> unload/step {unload32 / step32:.3f}")
    print(f"bf16 step {step16 * 1e3:.1f} ms, unload {unload16 * 1e3:.1f} ms -> unload/step {unload16 / step16:.3f}")
    print(f"fp32 step / bf16 step = {step32 / step16:.2f}")


if __name__ == "__main__":
    main()
