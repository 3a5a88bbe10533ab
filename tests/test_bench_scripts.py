"""The benchmark scripts run in their short mode (their figures live in bench/RESULTS.md; here
only that they run and print well-formed, sane numbers). bench/memory_fit.py and
bench/gpu_check.sh --smoke have tests of their own."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / args[0]), *args[1:]],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_checkpoint_size_ledger_is_a_small_fraction_of_full_copies():
    out = bench("checkpoint_size.py", "--stages", "1,2")
    ratio, break_even = re.search(r"ledger / copies at T=2: ([0-9.]+) \(break-even at T = (\d+)\)", out).groups()
    assert 0 < float(ratio) < 0.1 and int(break_even) > 2


def test_unload_cost_times_an_unload_against_a_step_in_both_dtypes():
    out = bench("unload_cost.py", "--steps", "2")
    rows = re.findall(r"(fp32|bf16) step ([0-9.]+) ms, unload ([0-9.]+) ms -> unload/step ([0-9.]+)", out)
    assert [r[0] for r in rows] == ["fp32", "bf16"]
    for _, step, unload, ratio in rows:
        assert float(step) > 0 and float(unload) > 0
        assert abs(float(ratio) - float(unload) / float(step)) < 0.002
