"""The ledger's incremental rank (Gram matrices extended stage by stage) equals the full
QR-based ``numerical_rank`` on the same factors, full-rank and rank-deficient alike."""

import torch

from plora_ray.ledger.rank import RankMeter, rank_in_background
from plora_ray.ledger.store import UnloadLedger


def numerical_rank(bs, as_, rtol=None):
    """Reference rank of sum_t B_t A_t from the stacked factors, via two QRs and a small SVD.

    B_cat (d x n) A_cat (n x k) = Q1 (R1 R2^T) Q2^T with n = sum of ranks, so the rank
    is that of the n x n core. Computed in float64; singular values below ``rtol * sigma_max``
    count as zero, ``rtol`` by default max(d, k) * eps(fp32) (the factors are fp32).
    """
    if not bs:
        return 0
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() for x in as_], dim=0)
    d, k = b.shape[0], a.shape[1]
    r1 = torch.linalg.qr(b, mode="r").R
    r2 = torch.linalg.qr(a.T, mode="r").R
    sv = torch.linalg.svdvals(r1 @ r2.T)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(d, k) * torch.finfo(torch.float32).eps) * sv[0]
    return int((sv > tol).sum())


def stages(d, k, r, t, gen):
    return [(torch.randn(d, r, generator=gen), torch.randn(r, k, generator=gen)) for _ in range(t)]


def check_every_stage(factors, d=48, k=40):
    ledger = UnloadLedger()
    for i, (b, a) in enumerate(factors, 1):
        ledger.add_stage({"w": (b, a)})
        bs, as_ = zip(*factors[:i])
        assert ledger.rank("w") == numerical_rank(list(bs), list(as_)), f"stage {i}"
    return ledger.rank("w")


def test_incremental_rank_equals_full_rank_on_random_factors():
    g = torch.Generator().manual_seed(0)
    assert check_every_stage(stages(48, 40, 4, 12, g)) == 40  # caps at min(d, k)


def test_incremental_rank_equals_full_rank_when_b_columns_repeat():
    g = torch.Generator().manual_seed(1)
    factors = stages(48, 40, 4, 5, g)
    b0 = factors[0][0]
    factors += [(b0 @ torch.randn(4, 4, generator=g), torch.randn(4, 40, generator=g)) for _ in range(2)]
    assert check_every_stage(factors) == 20  # B's column space does not grow: rank stays 20


def test_incremental_rank_equals_full_rank_when_a_rows_repeat_and_stages_cancel():
    g = torch.Generator().manual_seed(2)
    factors = stages(48, 40, 3, 4, g)
    b, a = factors[1]
    factors.append((-b, a))  # undoes stage 2 exactly: the sum loses 3 dimensions
    factors.append((torch.randn(48, 3, generator=g), factors[0][1]))  # A rows already present
    check_every_stage(factors)
    bs, as_ = zip(*factors)
    assert numerical_rank(list(bs), list(as_)) == 9  # 12 - 3 cancelled; the last adds to stage 1's A


def test_incremental_rank_of_zero_and_tiny_updates():
    ledger = UnloadLedger()
    ledger.add_stage({"w": (torch.zeros(16, 2), torch.randn(2, 24))})
    assert ledger.rank("w") == 0
    ledger.add_stage({"w": (torch.randn(16, 2), torch.randn(2, 24))})
    assert ledger.rank("w") == 2
    ledger.add_stage({"w": (1e-12 * torch.randn(16, 2), torch.randn(2, 24))})  # below the fp32 tolerance
    bs, as_ = zip(*ledger.factors["w"])
    assert ledger.rank("w") == numerical_rank(list(bs), list(as_)) == 2


def test_rank_after_loading_a_ledger_equals_the_live_one(tmp_path):
    g = torch.Generator().manual_seed(3)
    live = UnloadLedger()
    for b, a in stages(32, 24, 2, 6, g):
        live.add_stage({"x": (b, a), "y": (b[:, :1], a[:1])})
    live.save(tmp_path / "ledger")
    loaded = UnloadLedger.load(tmp_path / "ledger")
    assert loaded.ranks() == live.ranks() == {"x": 12, "y": 6}
    assert loaded.ranks(stages=3) == live.ranks(stages=3) == {"x": 6, "y": 3}


def test_on_disk_ledger_and_background_meter_match_the_in_memory_ledger(tmp_path):
    """Shards on disk hold the same factors; the meter's ranks for
    every stage, measured in its own thread, equal the synchronous ones."""
    g = torch.Generator().manual_seed(4)
    memory, disk = UnloadLedger(), UnloadLedger(tmp_path / "live")
    meter = RankMeter(disk)
    futures = []
    for b, a in stages(40, 30, 3, 8, g):
        memory.add_stage({"x": (b, a)})
        disk.add_stage({"x": (b, a)})
        futures.append(meter.submit(disk.num_stages))
    assert [f.result() for f in futures] == [memory.ranks(stages=t) for t in range(1, 9)]
    assert [f.result()["x"] for f in futures] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert disk.nbytes() == 0 and memory.nbytes() == disk.disk_bytes() - 8 * _header_bytes(tmp_path / "live")
    for (b1, a1), (b2, a2) in zip(memory.stage_factors("x"), disk.stage_factors("x")):
        assert torch.equal(b1, b2) and torch.equal(a1, a2)
    reopened = UnloadLedger(tmp_path / "live")  # a directory of shards is a ledger
    assert reopened.num_stages == 8 and reopened.ranks() == memory.ranks()
    meter.close()


def test_deferred_meter_measures_nothing_until_asked_then_the_same_ranks(tmp_path, monkeypatch):
    """plora.rank_measurement: checkpoint: no thread; each stage's ranks are computed on the
    first result() (the next checkpoint), equal to the synchronous ones."""
    import threading

    g = torch.Generator().manual_seed(5)
    disk = UnloadLedger(tmp_path / "live")
    meter = RankMeter(disk, background=False)
    calls = []
    real = disk.ranks
    monkeypatch.setattr(disk, "ranks", lambda *a: calls.append(threading.get_ident()) or real(*a))
    futures = []
    for b, a in stages(40, 30, 3, 4, g):
        disk.add_stage({"x": (b, a)})
        futures.append(meter.submit(disk.num_stages))
    assert calls == [] and not any(f.done() for f in futures)
    assert [f.result()["x"] for f in futures] == [3, 6, 9, 12]
    assert all(f.done() for f in futures) and set(calls) == {threading.get_ident()}
    assert futures[0].result() == {"x": 3} and len(calls) == 4  # computed once
    meter.close()


def test_auto_rank_measurement_waits_for_the_checkpoint_on_cpu():
    cpu = torch.nn.Linear(2, 2)
    assert not rank_in_background("auto", cpu) and not rank_in_background("checkpoint", cpu)
    assert rank_in_background("background", cpu)
    if torch.cuda.is_available():
        assert rank_in_background("auto", cpu.cuda())


def _header_bytes(directory):
    import struct

    with open(sorted(directory.iterdir())[0], "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_temporary_ledgers_of_dead_processes_are_removed():
    import subprocess
    import sys

    code = ("import os; from plora_ray.ledger.store import UnloadLedger; l = UnloadLedger.temporary(); "
            "l.add_stage({'w': (__import__('torch').ones(2, 1), __import__('torch').ones(1, 3))}); "
            "print(l.directory, flush=True); os._exit(0)")  # exits without cleaning up (like SIGKILL)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from pathlib import Path

    stale = Path(out.stdout.strip())
    assert stale.is_dir() and any(stale.iterdir())
    mine = UnloadLedger.temporary()
    assert not stale.exists() and mine.directory.is_dir()
    mine_dir = mine.directory
    del mine
    import gc

    gc.collect()
    assert not mine_dir.exists()  # a collected temporary ledger removes its directory
