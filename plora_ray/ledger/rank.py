"""The accumulated rank of the ledger's update, measured off the unload.

rank(sum_t B_t A_t) is computed from small matrices (the Grams of the stacked factors, never a
d x k SVD), layer by layer. :class:`RankMeter` measures each stage in one background thread at
the lowest CPU priority, or deferred to whoever first asks (the next checkpoint), so the unload
itself costs the same at every stage.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def _rank_from_grams(gb: torch.Tensor, ga: torch.Tensor, d: int, k: int, rtol: float | None) -> int:
    """Rank of B A from G_B = B^T B and G_A = A A^T (both n x n, float64).

    B = U_B S_B V_B^T and A^T = U_A S_A V_A^T with (V, S^2) the eigen-pairs of the Grams, so
    the singular values of B A are those of S_B V_B^T V_A S_A (n x n). Eigenvalues of a Gram
    carry an absolute error of ~eps64 * lambda_max, i.e. ~1.5e-8 * sigma_max on the
    singular values: far below the fp32-based tolerance, so the rank equals that of a
    QR-based SVD of the stacked factors (the reference ``numerical_rank`` of
    tests/test_ledger_rank.py). Singular values below ``rtol * sigma_max`` count as zero,
    ``rtol`` by default max(d, k) * eps(fp32) (the factors are fp32).
    """
    lb, vb = torch.linalg.eigh(gb)
    la, va = torch.linalg.eigh(ga)
    core = (lb.clamp_min(0).sqrt()[:, None] * (vb.T @ va)) * la.clamp_min(0).sqrt()[None, :]
    sv = torch.linalg.svdvals(core)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(d, k) * torch.finfo(torch.float32).eps) * sv[0]
    return int((sv > tol).sum())


def _lower_priority() -> None:
    """Run this thread (and the threads it starts) at the lowest CPU priority (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class RankMeter:
    """Measures the accumulated rank of each stage off the unload: one background thread at
    the lowest CPU priority, stage after stage in order, layer by layer from the ledger
    (the exact rule of :meth:`UnloadLedger.rank`). :meth:`submit` returns a Future of
    ``{layer: rank}``. ``ledger``: an :class:`~plora_ray.ledger.store.UnloadLedger` (what it
    needs of it is ``ranks(stages, rtol)``)."""

    def __init__(self, ledger, rtol: float | None = None, background: bool = True):
        self.ledger, self.rtol = ledger, rtol
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="plora-rank", initializer=_lower_priority)
                      if background else None)

    def submit(self, stages: int):
        if self._pool is None:  # deferred: measured by whoever first asks (the next checkpoint)
            return _Deferred(self.ledger.ranks, stages, self.rtol)
        return self._pool.submit(self.ledger.ranks, stages, self.rtol)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def rank_in_background(how: str, model: torch.nn.Module) -> bool:
    """``plora.rank_measurement``: ``auto`` measures in a background thread only where the
    steps leave the CPU idle (the model on a GPU); on CPU the thread would share the cores
    with the steps (PLoRA/LoRA step 0.90 on 2 cores, bench/RESULTS.md), so at the checkpoint."""
    if how == "auto":
        return any(p.device.type == "cuda" for p in model.parameters())
    return how == "background"


class _Deferred:
    """A Future-like result computed in the caller's thread on the first ``result()``: no
    thread competes with the training steps (on a machine of a few cores it would)."""

    def __init__(self, fn, *args):
        self._call, self._value, self._done = (fn, args), None, False

    def done(self) -> bool:
        return self._done

    def result(self):
        if not self._done:
            fn, args = self._call
            self._value, self._done = fn(*args), True
        return self._value
