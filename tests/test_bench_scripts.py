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


def test_throughput_tiny_times_both_sides_and_pairs_their_steps():
    out = bench("throughput.py", "--model", "tiny", "--dtype", "float32", "--steps", "1", "--warmup", "1")
    assert "model tiny, rows full, micro-batch 4 x 1024" in out
    rows = {name: (float(rate), float(step), int(n)) for name, rate, step, n in
            re.findall(r"^(Trainer\+PEFT fp32 weights|plora_ray fp32 weights) +(\d+) +([0-9.]+) +(\d+)$", out, re.M)}
    assert sorted(rows) == ["Trainer+PEFT fp32 weights", "plora_ray fp32 weights"]
    assert all(rate > 0 and step > 0 and n == 1 for rate, step, n in rows.values())
    paired = re.search(r"plora_ray fp32 weights step / the Trainer\+PEFT fp32 weights step before it: ([0-9.]+)$",
                       out, re.M).group(1)
    median, mine, theirs, ratio = re.search(
        r"median of the paired steps: ([0-9.]+)x \(medians: (\d+) / (\d+) = ([0-9.]+)x", out).groups()
    assert (float(mine), float(theirs)) == (rows["plora_ray fp32 weights"][0], rows["Trainer+PEFT fp32 weights"][0])
    # one timed step a side: the one paired ratio is the ratio of the medians
    assert paired == median == ratio
    mine, theirs, ratio = float(mine), float(theirs), float(ratio)
    assert abs(ratio - mine / theirs) <= 0.005 + ratio * (0.5 / mine + 0.5 / theirs)  # printed rounding


def test_mfu_tiny_prints_peak_mfu_and_a_profile():
    out = bench("mfu.py", "--model", "tiny", "--dtype", "float32", "--steps", "1", "--warmup", "1", "--profile")
    peaks = re.search(r"matmul peak: ([0-9. /]+) GFLOP/s .*the largest, ([0-9.]+), is used", out).groups()
    each = [float(p) for p in peaks[0].split(" / ")]
    assert len(each) == 3 and min(each) > 0 and float(peaks[1]) == max(each)  # before the run, after each step
    table = re.findall(r"^head on (labelled positions|every token \(convention\)) +([0-9.]+) +([0-9.]+) +([0-9.]+)%$",
                       out, re.M)
    assert [t[0] for t in table] == ["labelled positions", "every token (convention)"]
    for _, per_token, rate, mfu in table:
        assert float(per_token) > 0 and 0 <= float(mfu) <= 100
        # MFU = GFLOP/s / peak, to the printed rounding
        assert abs(float(mfu) - 100 * float(rate) / max(each)) <= 0.05 + 5 / max(each) + 1e-9
    assert float(table[1][1]) >= float(table[0][1]) and float(table[1][3]) >= float(table[0][3])
    tokens, mfu = re.search(r"^tokens/s (\d+); MFU .*: ([0-9.]+)% \(target", out, re.M).groups()
    assert int(tokens) > 0 and mfu == table[0][3]
    kinds = re.findall(r"^  (matmul|attention|copies and casts|element-wise and norms|other) +[0-9.]+ s +([0-9.]+)%$",
                       out, re.M)
    assert "profile of the last step" in out and "matmul" in [k for k, _ in kinds]
    assert abs(sum(float(share) for _, share in kinds) - 100) <= 0.05 * len(kinds) + 1e-9
    largest = out.split("its 12 largest operators:\n")[1].splitlines()
    ops = [re.fullmatch(r"  \S.* +(\d+) calls +[0-9.]+ s +[0-9.]+%", line) for line in largest]
    assert 1 <= len(ops) <= 12 and all(op and int(op.group(1)) > 0 for op in ops)


def test_packing_tiny_packed_and_padded_runs_agree_on_the_loss():
    out = bench("packing.py", "--model", "tiny", "--steps", "1", "--warmup", "1", "--micro", "4", "--max-length", "256")
    rates = {name: float(rate) for name, rate in
             re.findall(r"^(padded|grouped|packed) +(\d+) tokens/s  step [0-9.]+ s$", out, re.M)}
    assert sorted(rates) == ["grouped", "packed", "padded"] and min(rates.values()) > 0
    for name in ("grouped", "packed"):  # one timed step: the median ratio is the ratio of the rates
        ratio = float(re.search(rf"^{name} / padded tokens/s: ([0-9.]+)x$", out, re.M).group(1))
        assert abs(ratio - rates[name] / rates["padded"]) <= 0.005 + ratio * (0.5 / rates[name] + 0.5 / rates["padded"])
    steps, gap = re.search(r"packed vs padded loss, largest relative difference over (\d+) steps: (\S+)$",
                           out, re.M).groups()
    assert int(steps) == 2 and float(gap) < 1e-3
