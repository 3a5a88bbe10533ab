"""Why ZeRO-3's merged weights drift from one process (1.5e-5) while DDP/ZeRO-2 give 0.

    python bench/zero3_drift.py [--steps 4] [--memory-efficient-linear both|on|off]

Runs the same global steps (tiny model, fp32, unload + optimizer reset after every step)
once in one process (2 micro-batches accumulated) and once as 2 gloo processes under
ZeRO-3 (1 micro-batch each), and compares bitwise, per step, (a) rank 0's own micro-batch
gradient (a hook on each LoRA parameter, before any reduction; divided by the 2 the
workers' loss weight carries) against the one-process first micro-batch gradient, and
(b) the reduced gradient the step applies (``safe_get_full_grad``) against the
one-process accumulated one.

Measured (2026-11, DeepSpeed 0.19.8, torch 2.13 CPU, 1 thread per process):

    step   (a) rank-0 local vs one process      (b) reduced vs one process
      1    4278 / 16384 differ, max 7.5e-09      4242 / 16384 differ, max 9.3e-09
      2   13925 / 16384 differ, max 1.5e-08     13562 / 16384 differ, max 1.9e-08

identical with ``memory_efficient_linear`` on (DeepSpeed's default: F.linear replaced) and
off (not replaced). So:

* the difference exists at step 1, before any unload or optimizer reset, and already in a
  rank's *own* micro-batch gradient before any communication: it is **not** the
  reduce-scatter order (the note's suspicion), nor DeepSpeed's memory-efficient linear;
* nor the alignment of gathered weights inside ZeRO-3's flat buffers (a one-process run
  whose Linear weights are views at float offsets 0, 1, 3, 16 of a flat buffer gives
  bitwise identical gradients);
* it comes from ZeRO-3's forward/backward path itself (its module hooks and parameter
  gather/release around each sub-module); the exact operation is not pinned down yet.
  DDP and ZeRO-2 run the plain module and match one process bitwise.

The reset is only the amplifier: a fresh Adam's first update is lr * g / (|g| + eps) ~
lr * sign(g), so last-bit gradient noise on near-zero gradients becomes lr-sized weight
differences (1.5e-5 relative on merged weights after 4 resets at lr 1e-2), while with
``optimizer_on_unload: keep`` the same noise stays at 9e-7. Not cheaply fixable from
plora-ray: tests keep ZeRO-3's tolerance (1e-4) and DDP/ZeRO-2 exact.
"""

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUN = {"name": "drift", "seed": 0, "plora": {"unload_every_steps": 1, "momentum": 0.1},
       "optim": {"lr": 1e-2},
       "data": {"max_length": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 1}}


def config(steps, workers, engine):
    from plora_ray.config.io import build_run_config

    data = {**RUN, "data": {**RUN["data"], "max_steps": steps}}
    if workers == 1:
        data["data"] = {**data["data"], "gradient_accumulation_steps": 2}
    data["distributed"] = {"workers": workers, **engine}
    return build_run_config(data)


def train_capturing(run, steps, read_grad):
    """Train ``steps`` steps; the gradients each step applies, read just before it."""
    from plora_ray.run.loop import train_step

    grads, step = [], run.engine.step
    local = {}  # this process's own micro-batch gradients, before any reduction
    for n, p in run.model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: local.setdefault(n, []).append(g.detach().float().clone()) and None)

    def capture_then_step():
        full = {n: read_grad(p).detach().float().cpu().clone()
                for n, p in run.model.named_parameters() if p.requires_grad}
        # each of W workers back-propagates W x the one-process loss weight (run/engines.py): undo it
        grads.append({"full": full, "first_micro_batch": {n: v[0] / run.world for n, v in local.items()}})
        local.clear()
        step()

    run.engine.step = capture_then_step
    for mb in run.steps[:steps]:
        out = train_step(run, mb)
        if run.clock.step(out["samples"]):
            run.unloader.unload()
    return grads


def zero3_worker(rank, port, steps, mel, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from plora_ray.run import engines
    from plora_ray.run.loop import setup

    base = engines.deepspeed_config
    engines.deepspeed_config = lambda cfg, world: {**base(cfg, world), "zero_optimization": {
        **base(cfg, world)["zero_optimization"], "memory_efficient_linear": mel}}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    linear = torch.nn.functional.linear
    run = setup(config(steps, 2, {"engine": "deepspeed", "zero_stage": 3}), rank, 2)
    replaced = torch.nn.functional.linear is not linear
    grads = train_capturing(run, steps, safe_get_full_grad)
    if rank == 0:
        torch.save({"grads": grads, "linear_replaced": replaced, "threads": torch.get_num_threads(),
                    "attn": run.model.config._attn_implementation}, out)
    dist.destroy_process_group()


def compare(single, zero3):
    rows = []
    for step, (a, b) in enumerate(zip(single, zero3), 1):
        diff = n = flips = 0
        worst = 0.0
        for name, g in a.items():
            h = b[name].reshape(g.shape)
            ne = g != h
            diff += int(ne.sum())
            n += g.numel()
            flips += int(((g > 0) & (h < 0) | (g < 0) & (h > 0)).sum())
            worst = max(worst, float((g - h).abs().max()))
        rows.append((step, diff, n, worst, flips))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory-efficient-linear", choices=["both", "on", "off"], default="both")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from plora_ray.run.loop import setup

    single = train_capturing(setup(config(args.steps, 1, {"engine": "ddp"})), args.steps, lambda p: p.grad)
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.memory_efficient_linear]
    for mel in modes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "grads.pt")
            mp.start_processes(zero3_worker, args=(port, args.steps, mel, out), nprocs=2, start_method="spawn")
            res = torch.load(out)
        print(f"ZeRO-3, memory_efficient_linear={mel} (F.linear replaced: {res['linear_replaced']}, "
              f"torch threads {res['threads']}, attention {res['attn']})")
        print("step  differing grad elements  max |diff|  sign flips   (step 1 is before any unload; "
              "unload + optimizer reset after every step)")
        for key in ("first_micro_batch", "full"):
            print(f"-- {'rank 0 local gradient vs first micro-batch in one process' if key != 'full' else 'reduced gradient'}")
            for step, diff, n, worst, flips in compare([g[key] for g in single], [g[key] for g in res["grads"]]):
                print(f"{step:4d}  {diff:8d} / {n:<8d}      {worst:.2e}   {flips}")


if __name__ == "__main__":
    main()
