"""bench/gpu_check.sh and bench/gpu_check.py, the one-command GPU check: its CPU smoke mode (a tiny
Llama, 2 gloo workers: every check of the GPU run at toy size), what it says without a GPU, and
that its verdict fails when a check does. (About a minute: the smoke run.)"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def no_gpu_env():
    # CUDA hidden: the same answer on a machine with GPUs (where the full check would take minutes)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def test_without_a_gpu_the_command_says_skipped_and_exits_0():
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True,
                          env=no_gpu_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "skipped: no GPU"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True,
                          env=no_gpu_env(), timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("skipped: no GPU"), done.stdout + done.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=no_gpu_env(), timeout=600)
    return done, json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None


def test_smoke_mode_runs_every_check_of_the_gpu_run_on_the_cpu(smoke):
    done, results = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("gpu check: PASS"), lines[-5:]
    runs = results["runs"]
    assert list(runs) == ["reference", "zero2", "zero3"]
    assert runs["reference"]["world"] == 1 and runs["zero2"]["world"] == runs["zero3"]["world"] == 2
    layers = results["shape"]["num_hidden_layers"] * 7  # LoRA on the 7 linear modules of each layer
    for name, r in runs.items():
        assert r["checkpointing"] is True, name  # model.gradient_checkpointing reached the model
        assert [u["step"] for u in r["unloads"]] == [2, 4], name
        assert all(0 < u["output_change"] < 2e-2 for u in r["unloads"]), name
        assert r["replay"] == {"layers": layers, "differ": [], "n_differ": 0, "max_abs": 0.0}, name
        assert r["estimate"]["total"] > 0 and r["memory"]["rss_growth"] > 0, name
        assert r["timed_steps"] == 1 and r["flops"] > 0 and 0 < r["mfu"] < 1, name
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{layers}/{layers}" in row and " on " in row, row
    for name in ("zero2", "zero3"):
        cmp = runs[name]["compare"]
        assert 0 < cmp["loss"] < 1e-3 and 0 < cmp["update"] < 0.1, (name, cmp)


def test_the_verdict_fails_with_the_broken_check_named(smoke):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    _, results = smoke
    good = results["runs"]["zero3"]

    class Estimate:
        total, runtime = 10 * 2**30, 2**30

    assert gpu_check.judge("zero3", good, Estimate, False, good["compare"]) == []
    cases = {
        "checkpointing is off": {"checkpointing": False},
        "no unload happened": {"unloads": []},
        "changed the outputs": {"unloads": [{"step": 2, "output_change": 0.5}]},
        "W_0 + ledger differs": {"replay": {"layers": 14, "differ": ["l"], "n_differ": 1, "max_abs": 1e-3}},
        "would let this run OOM": {"memory": {"allocated": 9 * 2**30, "reserved": 11 * 2**30}},
    }
    for fragment, change in cases.items():
        bad = {**copy.deepcopy(good), **change}
        failures = gpu_check.judge("zero3", bad, Estimate, "allocated" in change.get("memory", {}), good["compare"])
        assert len(failures) == 1 and fragment in failures[0], (fragment, failures)
    far = {**good["compare"], "update": 0.5}
    assert "learned update" in gpu_check.judge("zero3", good, Estimate, False, far)[0]
