"""Fault injection for the cluster tests, run after every step by the one-worker trials (each
trains in its Tune function) of the test cluster's nodes (their ``ray start`` environment sets
``PLORA_TEST_STEP_FAULT=cluster_hooks:on_step``, ``PLORA_TEST_NODE`` and ``PLORA_TEST_DIR``;
tests/faults.py puts it into the workers from outside the library).

Rank 0 appends ``<sweep name>-<trial id> <node> <step>`` to ``$PLORA_TEST_DIR/steps.log`` (which node ran
which step of which trial). While ``$PLORA_TEST_DIR/hold`` exists and names this node, a
worker that finished step ``HOLD_STEP`` (the checkpoint of step HOLD_STEP - 1 is written)
writes ``reached-<run name>`` and waits there, so a test can kill its node or its sweep's
driver at a known point of a known trial.
"""

import os
import time
from pathlib import Path

HOLD_STEP = 5


def on_step(rec, rank):
    if rank != 0:
        return
    from ray import tune

    d, node = Path(os.environ["PLORA_TEST_DIR"]), os.environ["PLORA_TEST_NODE"]
    ctx = tune.get_context()  # a one-worker trial trains in its Tune function (sweep/tune.py)
    run = f"{ctx.get_experiment_name()}-{ctx.get_trial_id()}"
    with open(d / "steps.log", "a") as f:
        f.write(f"{run} {node} {rec['step']}\n")
    hold = d / "hold"
    if rec["step"] != HOLD_STEP or not hold.exists() or hold.read_text().strip() != node:
        return
    (d / f"reached-{run}").write_text(node)
    while hold.exists():
        time.sleep(0.2)
