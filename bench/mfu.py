"""Model FLOPs utilisation of plora_ray's training loop: model FLOP/s over a matmul peak
measured in the same run.

    python bench/mfu.py [--rows full|mix] [--steps 4] [--warmup 1] [--dtype bfloat16|float32]
                        [--method lora|full] [--group] [--profile] [--compile] [--model smollm2-135m-instruct|tiny]

The run: SmolLM2-135M-Instruct, LoRA r 8 on all seven linear modules (or full fine-tuning),
micro-batch 4 x 256, the rows of ``bench/throughput.py``, through ``loop.setup`` +
``loop.train_step``. The peak: the best of several 2048 x 2048 matmuls in the training dtype,
measured before the run and after every step (the largest counts: a conservative MFU on a
machine whose load varies).

Model FLOPs of a step, counted from its rows (T tokens of a row, K of them with a labelled
next token, N the base's matmul parameters without the embedding/LM head, V x d the head):

* LoRA on a frozen base: 4 N per token (forward, and the backward to activations only),
  4 V d per labelled position (the head's forward and backward; plora_ray projects only those),
  attention 6 L d T_ctx with causal T_ctx = (T + 1) / 2, and the adapters 6 r (in + out);
* full fine-tuning: 6 N per token, 6 V d per labelled position, the same attention.

Printed too: the conventional figure with the head on every token (4 (N + V d) per token,
what a loop that projects every position does), whose MFU counts that work as useful.
Last line: MFU. ``--model tiny``: plora_ray's built-in random Llama, rows of 1024 tokens (as in
``bench/throughput.py``): a check that the script runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import MICRO, MODEL, SEQ_OF, make_rows, plora_config  # noqa: E402


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` n x n matmuls (after one warm-up)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(cfg, examples, micro_batches, method: str, rank: int) -> tuple[float, float]:
    """(model FLOPs counting the head on labelled positions, the same with the head on every
    token) of one step."""
    c = cfg
    d, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, c.intermediate_size), (d, c.intermediate_size),
              (c.intermediate_size, d)]  # (in, out) of q k v o gate up down
    n_body = L * sum(i * o for i, o in shapes)
    lora = L * sum(i + o for i, o in shapes) * rank * 6 if method != "full" else 0
    mult = 6 if method == "full" else 4
    useful = every = 0.0
    for mb in micro_batches:
        for i in mb:
            ex = examples[i]
            t = len(ex["input_ids"])
            labelled = sum(1 for lab in ex["labels"][1:] if lab != -100)
            common = t * (mult * n_body + lora + 6 * L * d * (t + 1) / 2)
            useful += common + labelled * mult * V * d
            every += common + t * mult * V * d
    return useful, every


KINDS = (  # (kind, operator-name fragments): the first kind with a fragment in the name wins
    ("matmul", ("addmm", "mm", "matmul", "linear", "mkldnn")),
    ("attention", ("attention", "sdpa", "flash")),
    ("copies and casts", ("copy", "clone", "contiguous", "cat", "index", "gather", "scatter",
                          "fill", "zero", "empty", "resize", "slice", "view", "transpose", "expand",
                          "reshape", "select", "split", "unbind", "stride", "permute", "unsqueeze")),
    ("element-wise and norms", ("mul", "add", "sub", "div", "pow", "rsqrt", "silu", "exp", "log",
                                "neg", "mean", "sum", "softmax", "where", "sigmoid", "embedding",
                                "entropy", "nll", "max", "norm", "threshold", "clamp", "sqrt",
                                "lerp", "foreach")),
)


def by_kind(prof) -> dict[str, float]:
    """Self CPU time (us) of a profiled step, by kind of operator (KINDS; the rest: other)."""
    out: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower().removeprefix("aten::")
        kind = "copies and casts" if name in ("t", "to", "detach", "alias") else next(
            (k for k, frags in KINDS if any(f in name for f in frags)), "other")
        out[kind] = out.get(kind, 0.0) + event.self_cpu_time_total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="full", choices=["full", "mix"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--group", action="store_true", help="data.group_by_length")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the last step (torch.profiler): time by kind of operator")
    parser.add_argument("--compile", action="store_true", help="model.compile: the decoder layers compiled "
                        "(regional torch.compile); the warm-up steps, not timed, compile")
    parser.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"],
                        help="bench/RESULTS.md's figures: the default; tiny: plora_ray's built-in random "
                             "Llama (a quick check that the script runs)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from plora_ray.assets.fetch import model_path
    from plora_ray.run.loop import setup, train_step

    if args.model != "tiny":
        model_path(args.model)  # fetched and converted before any timing
    data = make_rows(args.rows, (args.steps + args.warmup + 1) * MICRO if args.rows == "full" else 200,
                     os.path.join(tempfile.mkdtemp(), "rows.jsonl"))
    cfg = plora_config(data, args.dtype, args.steps + args.warmup, args.group, model=args.model,
                       compiled=args.compile)
    cfg.method = args.method
    dtype = getattr(torch, args.dtype)
    peaks = [matmul_peak(dtype)]
    run = setup(cfg)
    model_cfg = run.model.config
    seconds = tokens = useful = every = 0.0
    for index, micro_batches in enumerate(run.steps):
        t0 = time.perf_counter()
        if args.profile and index == len(run.steps) - 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = train_step(run, micro_batches)
            dt = time.perf_counter() - t0
            profile = by_kind(prof)
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        else:
            out = train_step(run, micro_batches)
            dt = time.perf_counter() - t0
        peaks.append(matmul_peak(dtype))  # after every step: the load of a shared machine varies
        if index >= args.warmup:
            u, e = step_flops(model_cfg, run.examples, micro_batches, args.method, cfg.lora.rank)
            seconds, tokens, useful, every = seconds + dt, tokens + out["tokens"], useful + u, every + e
    peak = max(peaks)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{args.method}, {args.dtype} weights{', compiled layers' if args.compile else ''}, rows {args.rows}{' grouped' if args.group else ''}, "
          f"micro-batch {MICRO} x {SEQ_OF[args.model]}, {args.steps} timed steps after {args.warmup}")
    print(f"2048^2 {args.dtype} matmul peak: {' / '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s "
          f"(before the run, then after each step; the largest, {peak / 1e9:.1f}, is used)")
    print(f"{'count':34} {'GFLOP/token':>12} {'GFLOP/s':>9} {'MFU':>7}")
    for name, flops in (("head on labelled positions", useful), ("head on every token (convention)", every)):
        rate = flops / seconds
        print(f"{name:34} {flops / tokens / 1e9:12.3f} {rate / 1e9:9.1f} {rate / peak:7.1%}")
    print(f"tokens/s {tokens / seconds:.0f}; MFU (model FLOP/s / measured {args.dtype} matmul peak): "
          f"{useful / seconds / peak:.1%} (target >= 40%)")
    if args.profile:
        total = sum(profile.values())
        print("profile of the last step (self CPU time by kind of operator; the profiler's own "
              "overhead inflates the small ops):")
        for kind, us in sorted(profile.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:28} {us / 1e6:7.2f} s {us / total:6.1%}")
        print("its 12 largest operators:")
        for e in top:
            print(f"  {e.key:40} {e.count:6d} calls {e.self_cpu_time_total / 1e6:7.2f} s "
                  f"{e.self_cpu_time_total / total:6.1%}")


if __name__ == "__main__":
    main()
