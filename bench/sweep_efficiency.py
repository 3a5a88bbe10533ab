"""How much of a sweep's wall time is spent in training steps, with each trial's breakdown.

    python bench/sweep_efficiency.py [SWEEP.yaml] [--storage DIR]      # runs the sweep, then measures
    python bench/sweep_efficiency.py --from-storage DIR [--sweep NAME]  # measures a sweep already run

Runs ``python -m plora_ray.tune SWEEP --no-report`` (default: the main command's
``search_spaces/unload.yaml``) and times it, then reads each trial's phases from MLflow
(``phase/<name>_s``, logged by rank 0 of every trial, see ``plora_ray/run/loop.py``): Train
start-up, model load, tokenisation, engine set-up, training steps, unloads, evaluation,
checkpointing, and the rest of the trial's MLflow run (Tune/Train bookkeeping, teardown).

Two ratios, both printed:
* per trial: training steps ÷ the trial's wall time (its MLflow run, start to end);
* sweep: the sum of all trials' training steps ÷ (the sweep's wall time × the number of trials
  that ran side by side), i.e. the share of the slots the sweep had that went into steps.
The last line is the sweep ratio.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("train_start", "model_load", "tokenise", "engine", "steps", "unload", "evaluation", "checkpoint")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """How many of the intervals were open at once, at most (the sweep's concurrency)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def last_metric_time(client, run_id: str) -> int | None:
    """Milliseconds of the run's last logged step metric (``train/loss``, ``phase/steps_s``)."""
    times = [m.timestamp for key in ("train/loss", "phase/steps_s")
             for m in client.get_metric_history(run_id, key)]
    return max(times) if times else None


def measure(storage: Path, sweep_name: str | None, wall: float | None) -> float:
    from mlflow.tracking import MlflowClient

    from analysis.store import sweep_trials

    latest = sorted(storage.glob("*.latest.json"), key=lambda p: p.stat().st_mtime)
    if sweep_name:
        latest = [p for p in latest if p.name == f"{sweep_name}.latest.json"]
    if not latest:
        sys.exit(f"--from-storage: no sweep under {storage} (expected <name>.latest.json)")
    sweep = json.loads(latest[-1].read_text())
    client = MlflowClient(sweep["tracking_uri"])
    parent = client.get_run(sweep["parent_run_id"]).info
    if wall is None:  # the sweep's own run, start to end
        wall = ((parent.end_time or parent.start_time) - parent.start_time) / 1000
    rows, intervals = [], []
    for t in sweep_trials(sweep["tracking_uri"], sweep["parent_run_id"]):
        info = client.get_run(t["run_id"]).info
        if not info.end_time:
            continue
        # until its last report: a trial's MLflow run may be closed only when the sweep ends
        end = last_metric_time(client, t["run_id"]) or info.end_time
        span = (end - info.start_time) / 1000
        intervals.append((info.start_time / 1000, end / 1000))
        phases = {p: t["metrics"].get(f"phase/{p}_s", 0.0) for p in PHASES}
        phases["other"] = max(0.0, span - sum(phases.values()))
        rows.append((t["name"], t["status"], span, phases))
    if not rows:
        sys.exit("no finished trial with phase timings in this sweep")
    slots = max_overlap(intervals)
    cols = PHASES + ("other",)
    print(f"# sweep {sweep['name']}  machine: {cpu_model()}, {os.cpu_count()} logical CPUs")
    print("| trial | status | wall s | " + " | ".join(f"{c} s" for c in cols) + " | steps ÷ wall |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for name, status, span, ph in rows:
        print(f"| {name} | {status} | {span:.1f} | " + " | ".join(f"{ph[c]:.1f}" for c in cols)
              + f" | {ph['steps'] / span:.2f} |")
    total = {c: sum(r[3][c] for r in rows) for c in cols}
    spans = sum(r[2] for r in rows)
    print(f"| all ({len(rows)}) | | {spans:.1f} | " + " | ".join(f"{total[c]:.1f}" for c in cols)
          + f" | {total['steps'] / spans:.2f} |")
    print(f"\nshare of trial time: " + ", ".join(f"{c} {total[c] / spans:.0%}" for c in cols))
    ratio = total["steps"] / (wall * slots)
    print(f"sweep wall {wall:.1f} s, {slots} trial(s) side by side, steps in all trials {total['steps']:.1f} s")
    print(f"time in training steps ÷ (sweep wall × {slots} slots) = {ratio:.3f}")
    return ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", nargs="?", default="search_spaces/unload.yaml")
    ap.add_argument("--storage", help="where the sweep runs (default: a new temporary directory)")
    ap.add_argument("--from-storage", help="measure the newest sweep already run under this storage")
    ap.add_argument("--sweep", help="with --from-storage: the sweep's name in the file (default: newest)")
    args = ap.parse_args(argv)
    if args.from_storage:
        measure(Path(args.from_storage), args.sweep, None)
        return 0
    storage = Path(args.storage or tempfile.mkdtemp(prefix="sweep-eff-"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "plora_ray.tune", args.space, "--storage", str(storage),
                           "--no-report"])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"the sweep exited {proc.returncode}; its trials are measured as far as they got")
    measure(storage, None, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
