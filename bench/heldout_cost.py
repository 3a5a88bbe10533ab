"""The held-out loss of the main sweep: the vocabulary projection on the scored positions only
against the projection on every kept position, timed back to back in one run.

    python bench/heldout_cost.py [SWEEP.yaml] [--rounds 2] [--threads 1]

The model, tokenizer and held-out problems of the sweep's base (default: the main command's
``search_spaces/unload.yaml``: SmolLM2-135M-Instruct, 32 GSM8K problems, batch 8), one thread
as a trial's worker has. After a warm-up pass, each round times one pass of each form
(``plora_ray.evaluation.heldout.heldout_losses``; the reference form replaces ``head_on`` by a
no-op). Printed: seconds per pass, the largest difference of a per-problem loss, and, last,
the reference's median time over the new one's.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sweep_model(doc: str, rounds: int):
    """The command line of a sweep-evaluation bench (``[SWEEP.yaml] [--rounds] [--threads]``)
    and what it times: (args, the sweep base's run config, its model in eval mode, tokenizer,
    held-out examples), ``--threads`` set."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default=str(ROOT / "search_spaces" / "unload.yaml"))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from plora_ray.evaluation import heldout
    from plora_ray.run.models import build_model
    from plora_ray.config.sweep import load_sweep
    from plora_ray.config.trials import trial_run_config

    torch.set_num_threads(args.threads)
    cfg = trial_run_config(load_sweep(args.sweep), {})
    model, tok = build_model(cfg)
    model.eval()
    return args, cfg, model, tok, heldout.prepare_heldout(cfg, tok, [])[1]


def main() -> None:
    import torch

    from plora_ray.evaluation import heldout

    args, cfg, model, tok, examples = sweep_model(__doc__, rounds=2)
    batch = cfg.eval.batch_size
    kept = sum(len(e["input_ids"]) for e in examples)
    scored = sum(sum(x != -100 for x in e["labels"][1:]) for e in examples)
    real = heldout.head_on

    def timed(form: str):
        heldout.head_on = real if form == "scored" else (lambda model, select: contextlib.nullcontext())
        try:
            t = time.perf_counter()
            out = heldout.heldout_losses(model, tok, examples, batch_size=batch)
            return time.perf_counter() - t, out
        finally:
            heldout.head_on = real

    timed("scored")  # warm-up
    times = {"every": [], "scored": []}
    losses = {}
    for _ in range(args.rounds):
        for form in ("every", "scored"):
            dt, losses[form] = timed(form)
            times[form].append(dt)
    diff = max(abs(a[0] - b[0]) for a, b in zip(losses["every"], losses["scored"], strict=True))
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); {cfg.model.name_or_path} "
          f"{next(model.parameters()).dtype}; {len(examples)} held-out problems, batch {batch}, "
          f"{kept} tokens, {scored} scored")
    print("| head on | seconds per pass (rounds) | median |")
    print("|---|---|---|")
    for form, label in (("every", "every kept position"), ("scored", "scored positions only")):
        print(f"| {label} | {' '.join(f'{t:.2f}' for t in times[form])} | {statistics.median(times[form]):.2f} |")
    print(f"largest per-problem loss difference: {diff:.2e}")
    print(f"held-out pass, head on every kept position / scored only: "
          f"{statistics.median(times['every']) / statistics.median(times['scored']):.3f}")


if __name__ == "__main__":
    main()
