"""Data-parallel efficiency: N Ray Train workers against one, the same global batch.

    python bench/dp_efficiency.py [--config examples/smollm2.yaml] [--workers 2] [--steps 8]
                                  [--engine ddp|deepspeed] [--zero 2] [--group-by-length]

Both runs go through ``python -m plora_ray.train``: N workers on Ray Train (gloo on CPU), each
with one CPU thread (``distributed.cpus_per_worker: 1``); one worker runs in the process itself
(how the CLI runs ``--workers 1``), held to one thread by ``OMP_NUM_THREADS=1``. The same rows, micro-batch and global
batch (1 worker accumulates N micro-batches where N workers take one each). Throughput is
samples/s over the steps after two warm-up steps (median step time, from the run's
``metrics.jsonl``); unloads are kept out (``unload_every_steps`` past the last step) so
only steps are timed. Both runs take the same rows in every step, so the steps pair up:
efficiency = the median over steps of tokens/s(N) ÷ (N × tokens/s(1)), the same step in both
runs (the last line). A step's time on N workers is its slowest rank's: with rows of mixed
lengths one rank pads to a long row while another waits, so ``--group-by-length``
(``data.group_by_length``: the micro-batches of a step have similar lengths) is the setting
to compare.
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
           "--set", "eval.tasks=[]", "--set", "eval.heldout.files=[]",
           "--set", f"data.group_by_length={str(args.group_by_length).lower()}"]
    if args.engine == "deepspeed":
        cmd += ["--zero", str(args.zero)]
    # one worker runs in the training process itself (no Ray): held to one thread like a worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if workers == 1 else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{workers} worker(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    rates = [r["tokens_per_s"] for r in steps[2:]]  # global tokens of a step ÷ its wall time
    return {"workers": workers, "steps": len(steps), "rates": rates, "tokens_per_s": statistics.median(rates)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/smollm2.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2, help="per global step (a multiple of --workers)")
    ap.add_argument("--engine", default="ddp", choices=["ddp", "deepspeed"])
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--group-by-length", action="store_true", help="data.group_by_length=true in both runs")
    args = ap.parse_args(argv)
    if args.micro_batches % args.workers:
        sys.exit("--micro-batches must be a multiple of --workers (the same global batch for both runs)")
    tmp = Path(tempfile.mkdtemp(prefix="dp-eff-"))
    one = run(args, 1, tmp / "one")
    many = run(args, args.workers, tmp / "many")
    # the same global batch and rows in both: tokens/s is proportional to samples/s
    per_step = [m / (args.workers * o) for o, m in zip(one["rates"], many["rates"])]
    eff = statistics.median(per_step)
    print(f"# {cpu_model()}, {os.cpu_count()} logical CPUs; {args.config}, engine {args.engine}"
          + (f" ZeRO-{args.zero}" if args.engine == "deepspeed" else "")
          + f", global batch {args.micro_batch_size * args.micro_batches}, {args.steps} steps (2 warm-up)"
          + (", length-grouped" if args.group_by_length else ""))
    print("| workers | threads each | median tokens/s |")
    print("|---|---|---|")
    for r in (one, many):
        print(f"| {r['workers']} | 1 | {r['tokens_per_s']:.0f} |")
    print("per step: " + " ".join(f"{e:.2f}" for e in per_step))
    print(f"tokens/s with {args.workers} workers ÷ ({args.workers} × 1 worker), median over the same steps = {eff:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
