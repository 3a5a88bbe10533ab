"""Data-parallel efficiency: N Ray Train workers against one, the same global batch.

    python bench/dp_efficiency.py [--config examples/smollm2.yaml] [--workers 2] [--steps 8]
                                  [--engine ddp|deepspeed] [--zero 2]

Both runs go through ``python -m plora_ray.train`` (Ray Train, gloo on CPU), each worker with
one CPU thread (``distributed.cpus_per_worker: 1``), the same rows, micro-batch and global
batch (1 worker accumulates N micro-batches where N workers take one each). Throughput is
samples/s over the steps after two warm-up steps (median step time, from the run's
``metrics.jsonl``); unloads are kept out (``unload_every_steps`` past the last step) so
only steps are timed. Efficiency = samples/s(N) ÷ (N × samples/s(1)); the last line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweep_efficiency import cpu_model  # noqa: E402


def run(args, workers: int, out: Path) -> dict:
    accumulation = args.micro_batches // workers
    cmd = [sys.executable, "-m", "plora_ray.train", args.config, "--output", str(out),
           "--workers", str(workers), "--engine", args.engine,
           "--set", "distributed.cpus_per_worker=1",
           "--set", f"data.micro_batch_size={args.micro_batch_size}",
           "--set", f"data.gradient_accumulation_steps={accumulation}",
           "--set", f"data.max_steps={args.steps}",
           "--set", "plora.unload_every_samples=null", "--set", f"plora.unload_every_steps={args.steps + 1}",
           "--set", "save_merged=false",
           "--set", "eval.tasks=[]", "--set", "eval.heldout.files=[]"]
    if args.engine == "deepspeed":
        cmd += ["--zero", str(args.zero)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{workers} worker(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    rates = [r["tokens_per_s"] for r in steps[2:]]  # global tokens of a step ÷ its wall time
    return {"workers": workers, "steps": len(steps), "tokens_per_s": statistics.median(rates)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/smollm2.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2, help="per global step (a multiple of --workers)")
    ap.add_argument("--engine", default="ddp", choices=["ddp", "deepspeed"])
    ap.add_argument("--zero", type=int, default=2)
    args = ap.parse_args(argv)
    if args.micro_batches % args.workers:
        sys.exit("--micro-batches must be a multiple of --workers (the same global batch for both runs)")
    tmp = Path(tempfile.mkdtemp(prefix="dp-eff-"))
    one = run(args, 1, tmp / "one")
    many = run(args, args.workers, tmp / "many")
    # the same global batch and rows in both: tokens/s is proportional to samples/s
    eff = many["tokens_per_s"] / (args.workers * one["tokens_per_s"])
    print(f"# {cpu_model()}, {os.cpu_count()} logical CPUs; {args.config}, engine {args.engine}"
          + (f" ZeRO-{args.zero}" if args.engine == "deepspeed" else "")
          + f", global batch {args.micro_batch_size * args.micro_batches}, {args.steps} steps (2 warm-up)")
    print("| workers | threads each | median tokens/s |")
    print("|---|---|---|")
    for r in (one, many):
        print(f"| {r['workers']} | 1 | {r['tokens_per_s']:.0f} |")
    print(f"tokens/s with {args.workers} workers ÷ ({args.workers} × 1 worker) = {eff:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
