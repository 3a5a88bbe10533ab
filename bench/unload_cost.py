"""What an unload costs against a training step, and bf16 against fp32 steps.

    python bench/unload_cost.py [--hidden 256] [--layers 4] [--steps 10]
    python bench/unload_cost.py --llama7b [--blocks 32] [--rank 8] [--stages 50] [--every 10] [--batch 4 --seq 256]
    python bench/unload_cost.py --engines zero0,zero2,zero3 [--hidden 256] [--layers 4] [--steps 4]

Default: for one tiny-model size, the median time of a training step (fp32 and bf16
backbone) and of an unload (merge + ledger append + re-init + optimizer reset), and the
ratios unload / step and fp32 step / bf16 step, all measured in this process. The rank is
measured off the unload by a background thread; its time is printed apart (waited for
outside the timed unload).

``--llama7b``: one unload at LLaMA-7B layer shapes (``--blocks`` decoder blocks of q, k, v,
o 4096 x 4096, gate, up 11008 x 4096, down 4096 x 11008, ``--dtype`` on the CPU (auto: what
``model.dtype: auto`` picks here, bf16 where the CPU has AMX, else fp32), LoRA r fp32 with
AdamW state), repeated for T = 1..``--stages`` with fresh random factors at every stage,
split into its parts (merge, ledger append, re-init, optimizer reset, rank submit) and the
background rank measurement (its own thread, waited for after the unload); also the
ledger's bytes in host memory and on disk; then one LoRA training step of the same blocks
(``--batch`` x ``--seq`` tokens: forward, backward into the adapters, AdamW) timed in the same
run. The last lines: the unload at the last T scaled to 224 layers against the 1 s budget, last
T / median T (flat in T: ~1), and the unload / the 7B step (the issue's target: <= 0.5). Needs ~0.4 GB
per block; the ledger goes to a temporary directory (80 MB per stage at 32 blocks).

``--engines``: the default measurement on 2 CPU workers (torch.distributed gloo, one thread
each) per engine (``ddp``, ``zero0``, ``zero2``, ``zero3``: DeepSpeed ZeRO stages, fp32):
median step and unload over ``--steps`` of each, with the unload's parts, on rank 0 (which
also holds the ledger).
"""

import argparse
import statistics
import time

import torch

from plora_ray.config.hardware import auto_dtype
from plora_ray.config.io import build_run_config
from plora_ray.run.models import DTYPES
from plora_ray.run.loop import setup, train_step


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
    unloads, ranks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        e = run.unloader.unload()
        t1 = time.perf_counter()
        e.ranks  # the background measurement, waited for outside the unload
        unloads.append(t1 - t0)
        ranks.append(time.perf_counter() - t1)
    return step, statistics.median(unloads), statistics.median(ranks)


SHAPES_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
             "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
             "down_proj": (4096, 11008)}


class Block(torch.nn.Module):
    """A LLaMA-7B decoder block's linear layers and its dataflow (causal attention over 32
    heads of 128, SwiGLU MLP, residuals; no norms or rotary: they are < 1 % of its FLOPs)."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        for name, (d, k) in SHAPES_7B.items():
            self.add_module(name, torch.nn.Linear(k, d, bias=False, dtype=dtype))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, 32, 128).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.o_proj(a.transpose(1, 2).reshape(b, t, 4096))
        return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def llama7b_step(model, opt, batch, seq, dtype, repeats=1):
    """Median seconds of one LoRA training step of ``model`` (its blocks) on ``batch`` x ``seq``
    tokens: forward, backward into the adapters (frozen base), AdamW step. The first run is a
    warm-up."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, 4096, generator=g).to(dtype)
    out = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def llama7b_unloads(args):
    from peft import LoraConfig, get_peft_model

    from plora_ray.core.access import LocalAccess
    from plora_ray.core.unloader import PeriodicUnloader, lora_parameters
    from plora_ray.kernels.merge_bf16 import merge_bf16_
    from plora_ray.ledger.rank import RankMeter
    from plora_ray.ledger.store import UnloadLedger

    with torch.device("cpu"):
        model = torch.nn.Sequential(*[Block(DTYPES[args.dtype]) for _ in range(args.blocks)])
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                             target_modules=list(SHAPES_7B)), autocast_adapter_dtype=True)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ledger = UnloadLedger.temporary()  # on disk: host memory O(1) in T
    unloader = PeriodicUnloader(model, opt, momentum=0.1, access=LocalAccess(fused=merge_bf16_),
                                ledger=ledger, meter=RankMeter(ledger))
    model_bytes = sum(layer.get_base_layer().weight.nbytes for layer in unloader.layers.values())
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in range(1, args.stages + 1):
        for p in params:  # a stage of "training": new factors and Adam state
            p.data.copy_(torch.randn(p.shape, generator=g) * 1e-2)
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        e = unloader.unload()
        held = unloader.ledger.nbytes()  # factors in host memory (0: on disk)
        t0 = time.perf_counter()
        max_rank = e.max_rank  # waits for the background measurement
        rank_s = time.perf_counter() - t0
        rows.append((t, e.seconds, e.parts, max_rank))
        if t == 1 or t % args.every == 0 or t == args.stages:
            print(f"{t:4d}  {e.seconds:8.3f}  " + "  ".join(f"{e.parts[k]:8.3f}" for k in PARTS) +
                  f"  {rank_s:10.3f}  {max_rank:5d}  {held / model_bytes:9.4f}  "
                  f"{unloader.ledger.disk_bytes() / 1e9:7.2f}", flush=True)
    step = llama7b_step(model, opt, args.batch, args.seq, DTYPES[args.dtype]) if args.seq else 0.0
    # the memory floor of a merge: one in-place read+write pass over the same weights
    weights = [layer.get_base_layer().weight.data for layer in unloader.layers.values()]
    passes = []
    for _ in range(3):
        t0 = time.perf_counter()
        for w in weights:
            w.view(torch.int16 if w.element_size() == 2 else torch.int32).bitwise_xor_(0)  # a pure memory pass
        passes.append(time.perf_counter() - t0)
    return rows, min(passes), model_bytes, step


PARTS = ("merge", "ledger", "reinit", "optimizer", "rank")  # "rank": submitting it to the meter


def main_llama7b(args):
    layers = 7 * args.blocks
    print(f"one unload at LLaMA-7B shapes: {args.blocks} blocks ({layers} layers), r {args.rank}, {args.dtype} "
          f"backbone, torch threads {torch.get_num_threads()}; seconds")
    print("   T     total  " + "  ".join(f"{k:>8}" for k in PARTS) +
          "  rank (bg)  max rank  RAM/model  disk GB")
    from plora_ray.kernels.merge_bf16 import kernel

    fused = kernel(args.rank) is not None
    rows, floor, model_bytes, step = llama7b_unloads(args)
    t, seconds, _, _ = rows[-1]
    typical = statistics.median(r[1] for r in rows[1:] or rows)  # T = 1 includes first-call warm-up
    merge = statistics.median(r[2]["merge"] for r in rows[1:] or rows)
    scale = 224 / layers
    print(f"memory floor: one in-place read+write pass over the {model_bytes / 1e9:.2f} GB of "
          f"{args.dtype} weights (integer xor 0) takes {floor:.3f} s ({2 * model_bytes / floor / 1e9:.1f} GB/s; x{scale:.2f} "
          f"-> {floor * scale:.2f} s for 224 layers); median merge / that pass: {merge / floor:.2f} (1.0: "
          f"the merge runs at memory speed; the 1 s budget for 224 layers needs "
          f"{2 * model_bytes * scale / 1e9:.0f} GB/s of memory bandwidth); fused bf16 merge kernel: "
          f"{('on' if fused else 'off (PyTorch ops)') if args.dtype == 'bfloat16' else 'not used (fp32: one addmm_)'}")
    if step:
        print(f"one LoRA training step of the same {args.blocks} blocks, {args.batch} x {args.seq} tokens (forward, "
              f"backward into the adapters, AdamW; after a warm-up): {step:.2f} s (x{scale:.2f} -> "
              f"{step * scale:.1f} s for 32 blocks; embedding, norms and the 32k-vocabulary head left out, "
              f"so a real step is longer)")
    print(f"unload at T={t}: {seconds:.3f} s for {layers} layers (x{scale:.2f} -> {seconds * scale:.2f} s for "
          f"224); ratio to the 1 s budget: {seconds * scale:.2f}; unload at T={t} / median over T: "
          f"{seconds / typical:.2f}")
    if step:
        print(f"unload at T={t} / one 7B step, both measured here: {seconds / step:.3f} (target <= 0.5)")


ENGINES = {"ddp": {"engine": "ddp"}, "zero0": {"engine": "deepspeed", "zero_stage": 0},
           "zero2": {"engine": "deepspeed", "zero_stage": 2}, "zero3": {"engine": "deepspeed", "zero_stage": 3}}


def engine_worker(rank, world, port, engine, args, out):
    import json
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = build_run_config({
        "plora": {"unload_every_steps": 10**9},
        "model": {"tiny": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "intermediate_size": 4 * args.hidden}},
        "data": {"max_length": 128, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "epochs": 3},
        "distributed": {"workers": world, **ENGINES[engine]}})
    run = setup(cfg, rank, world)
    steps = iter(run.steps)
    train_step(run, next(steps))  # warm-up
    step_s, unload_s, parts = [], [], []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(run, next(steps))
        step_s.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        e = run.unloader.unload()
        unload_s.append(time.perf_counter() - t0)
        e.ranks  # rank 0's background measurement, outside the timed unload
        parts.append(e.parts)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step": statistics.median(step_s), "unload": statistics.median(unload_s),
                       "parts": {k: statistics.median(p[k] for p in parts) for k in PARTS}}, f)
    dist.barrier()
    os._exit(0)  # leaving a gloo group with DDP attached can hang (tests/test_replicas.py)


def main_engines(args):
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    print(f"2 CPU workers (gloo, 1 thread each), tiny llama hidden {args.hidden}, {args.layers} layers, "
          f"4 x 128 tokens per worker; medians of {args.steps}; ms")
    print(f"{'engine':7} {'step':>8} {'unload':>8} {'ratio':>6}  " + "  ".join(f"{k:>9}" for k in PARTS))
    for engine in args.engines.split(","):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/rank0.json"
            mp.start_processes(engine_worker, args=(2, port, engine, args, out), nprocs=2, start_method="spawn")
            r = json.load(open(out))
        print(f"{engine:7} {r['step'] * 1e3:8.1f} {r['unload'] * 1e3:8.1f} {r['unload'] / r['step']:6.3f}  " +
              "  ".join(f"{r['parts'][k] * 1e3:9.1f}" for k in PARTS), flush=True)


def main():
    p = argparse.ArgumentParser(description="one unload vs one step (tiny Llama); --engines: on 2 "
                                "Ray workers; --llama7b: per part at LLaMA-7B layer shapes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--engines", nargs="?", const="ddp,zero0,zero2,zero3", help="engines to compare")
    mode.add_argument("--llama7b", action="store_true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, help="timed steps (default 10; 4 with --engines)")
    p.add_argument("--blocks", type=int, default=32, help="--llama7b: transformer blocks to build")
    p.add_argument("--rank", type=int, default=8, help="--llama7b: LoRA rank")
    p.add_argument("--stages", type=int, default=50, help="--llama7b: unloads (T)")
    p.add_argument("--every", type=int, default=10, help="--llama7b: print every N stages")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="--llama7b: the backbone's dtype (auto: what model.dtype auto picks on this machine)")
    p.add_argument("--batch", type=int, default=4, help="--llama7b: rows of the timed step")
    p.add_argument("--seq", type=int, default=256, help="--llama7b: tokens per row of the timed step (0: no step)")
    args = p.parse_args()
    if args.engines:
        args.steps = args.steps or 4
        return main_engines(args)
    if args.llama7b:
        if args.dtype == "auto":
            args.dtype = auto_dtype(torch.cuda.is_available())
        return main_llama7b(args)
    args.steps = args.steps or 10
    torch.manual_seed(0)
    step32, unload32, rank32 = measure("float32", args)
    step16, unload16, rank16 = measure("bfloat16", args)
    print(f"model: tiny llama hidden {args.hidden}, {args.layers} layers, micro-batch 8 x 128 tokens")
    print(f"fp32 step {step32 * 1e3:.1f} ms, unload {unload32 * 1e3:.1f} ms -> unload/step {unload32 / step32:.3f}"
          f" (rank, background: {rank32 * 1e3:.1f} ms)")
    print(f"bf16 step {step16 * 1e3:.1f} ms, unload {unload16 * 1e3:.1f} ms -> unload/step {unload16 / step16:.3f}"
          f" (rank, background: {rank16 * 1e3:.1f} ms)")
    print(f"fp32 step / bf16 step = {step32 / step16:.2f}")


if __name__ == "__main__":
    main()
