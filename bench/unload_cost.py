"""What an unload costs against a training step, and bf16 against fp32 steps.

    python bench/unload_cost.py [--hidden 256] [--layers 4] [--steps 10]
    python bench/unload_cost.py --llama7b [--blocks 32] [--rank 8] [--stages 50] [--every 10]

Default: for one tiny-model size, the median time of a training step (fp32 and bf16
backbone) and of an unload (merge + ledger + rank + reset), and the ratios
unload / step and fp32 step / bf16 step, all measured in this process.

``--llama7b``: one unload at LLaMA-7B layer shapes (``--blocks`` decoder blocks of q, k, v,
o 4096 x 4096, gate, up 11008 x 4096, down 4096 x 11008, bf16 on the CPU, LoRA r fp32 with
AdamW state), repeated for T = 1..``--stages`` with fresh random factors at every stage,
split into its parts (merge, ledger + incremental rank bookkeeping, re-init, optimizer
reset, rank); the last line is the unload at the last T against the 1 s budget (half a
7B step). Needs ~0.4 GB per block plus the ledger (80 MB per stage at 32 blocks).
"""

import argparse
import statistics
import sys
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


SHAPES_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
             "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
             "down_proj": (4096, 11008)}


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, (d, k) in SHAPES_7B.items():
            self.add_module(name, torch.nn.Linear(k, d, bias=False, dtype=torch.bfloat16))


def llama7b_unloads(args):
    from peft import LoraConfig, get_peft_model

    from plora_ray.plora import PeriodicUnloader, lora_parameters

    with torch.device("cpu"):
        model = torch.nn.Sequential(*[Block() for _ in range(args.blocks)])
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                             target_modules=list(SHAPES_7B)), autocast_adapter_dtype=True)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    unloader = PeriodicUnloader(model, opt, momentum=0.1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in range(1, args.stages + 1):
        for p in params:  # a stage of "training": new factors and Adam state
            p.data.copy_(torch.randn(p.shape, generator=g) * 1e-2)
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        e = unloader.unload()
        rows.append((t, e.seconds, e.parts, e.max_rank))
        if t == 1 or t % args.every == 0 or t == args.stages:
            print(f"{t:4d}  {e.seconds:8.3f}  " + "  ".join(f"{e.parts[k]:8.3f}" for k in PARTS) +
                  f"  {e.max_rank:5d}", flush=True)
    return rows


PARTS = ("merge", "ledger", "reinit", "optimizer", "rank")


def main_llama7b(args):
    layers = 7 * args.blocks
    print(f"one unload at LLaMA-7B shapes: {args.blocks} blocks ({layers} layers), r {args.rank}, bf16 "
          f"backbone, torch threads {torch.get_num_threads()}; seconds")
    print("   T     total  " + "  ".join(f"{k:>8}" for k in PARTS) + "  max rank")
    rows = llama7b_unloads(args)
    t, seconds, _, _ = rows[-1]
    scale = 224 / layers
    print(f"unload at T={t}: {seconds:.3f} s for {layers} layers (x{scale:.2f} -> {seconds * scale:.2f} s for "
          f"224); ratio to the 1 s budget: {seconds * scale:.2f}")


def main():
    if "--llama7b" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--llama7b", action="store_true")
        p.add_argument("--blocks", type=int, default=32)
        p.add_argument("--rank", type=int, default=8)
        p.add_argument("--stages", type=int, default=50)
        p.add_argument("--every", type=int, default=10, help="print every N stages")
        return main_llama7b(p.parse_args())
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
