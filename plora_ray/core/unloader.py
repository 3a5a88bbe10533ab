"""PeriodicLoRA (arXiv 2402.16141): the whole algorithm, torch + peft only.

Training is split into stages. Inside a stage only the LoRA factors A (r x k) and
B (d x r) train. At each unload point

    W <- W + c * s * B A            c = 1 - m, s = alpha / r, computed in fp32, cast once

then the adapter is re-set by the momentum rule, the LoRA parameters' optimizer state is
reset (or kept / pruned) and the LR schedule restarts (or continues). After T stages
W_T = W_0 + sum_t c s B_t A_t, whose rank can reach T r at LoRA's memory cost.

Momentum rules (the paper's wording, "scaling the BA product by (1 - m) and A and B
matrices by m", admits two readings):

* ``preserve`` (default): merge (1-m) s BA and keep m s BA in the adapter (B <- m B,
  A kept). The adapter's output leaves it and enters W, so the model's outputs just
  after an unload equal those just before it.
* ``paper``: merge (1-m) s BA and scale A and B by m each; the adapter keeps m^2 s BA,
  so the outputs change by -(m - m^2) s BA.

With m = 0 both are the plain unload: merge all, B <- 0, A re-initialised (peft's own
init: kaiming-uniform a=sqrt(5), or gaussian std 1/r), seeded by (seed, stage, layer) so
that every data-parallel rank draws the same A.

The ledger keeps every stage's merged factors (c s B_t, A_t) in fp32, one append-only
safetensors shard per stage on disk (host memory: the stage being written), so W_T can be
rebuilt exactly from W_0. The rank of the accumulated update is measured from small
matrices (Grams of the stacked factors, never a d x k SVD), layer by layer, in a background
thread (:class:`RankMeter`): the unload itself costs the same at every stage.

Distributed engines (DeepSpeed ZeRO) hold their own copies of parameters and optimizer
state: they pass a :class:`LocalAccess` subclass that reads, writes and resets through them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch
from peft.tuners.lora import LoraLayer

MOMENTUM_RULES = ("preserve", "paper")
OPTIMIZER_ON_UNLOAD = ("reset", "keep", "prune")
ADAPTER = "default"


# ----------------------------------------------------------------------------- clock


class UnloadClock:
    """Decides when to unload, from samples actually consumed or optimizer steps.

    Call :meth:`step` once per optimizer step with the number of samples that step
    consumed (all micro-batches of the accumulation, all data-parallel workers). With
    ``every_samples = N`` an unload fires at the first step boundary at which the total
    number of samples reaches a multiple of N (exactly at k*N when steps align with it;
    several multiples crossed in one step give one unload). With ``every_steps = K``
    every K-th step unloads. With neither it never fires (plain LoRA).
    """

    def __init__(self, every_samples: int | None = None, every_steps: int | None = None):
        if every_samples is not None and every_steps is not None:
            raise ValueError("give every_samples or every_steps, not both")
        self.every_samples = every_samples
        self.every_steps = every_steps
        self.steps = 0
        self.samples = 0
        self.samples_since_unload = 0
        self.steps_since_unload = 0
        self.unloads = 0

    def step(self, samples: int) -> bool:
        if samples < 0:
            raise ValueError("samples must be >= 0")
        self.steps += 1
        self.samples += samples
        self.samples_since_unload += samples
        self.steps_since_unload += 1
        due = False
        if self.every_samples is not None and self.samples_since_unload >= self.every_samples:
            self.samples_since_unload %= self.every_samples
            due = True
        if self.every_steps is not None and self.steps_since_unload >= self.every_steps:
            due = True
        if due:
            self.steps_since_unload = 0
            self.unloads += 1
        return due

    def state_dict(self) -> dict:
        keys = ("steps", "samples", "samples_since_unload", "steps_since_unload", "unloads")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


# -------------------------------------------------------------------------- schedule


class StageLR:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR`` that knows about unloads.

    ``kind``: constant | linear | cosine (decay to 0 over ``horizon_steps``), after a
    linear warm-up of ``warmup_steps``. ``on_unload='restart'`` counts the schedule from
    the last unload (the paper resets the scheduler state); ``'continue'`` ignores
    unloads. ``rewarmup_steps`` multiplies the LR by a linear ramp after every unload
    (ReLoRA's jagged schedule). Being a callable object, its state is saved by LambdaLR's
    ``state_dict``.
    """

    def __init__(self, kind="constant", warmup_steps=0, horizon_steps=None, on_unload="restart",
                 rewarmup_steps=0):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}")
        if on_unload not in ("restart", "continue"):
            raise ValueError(f"unknown scheduler_on_unload {on_unload!r}")
        if kind != "constant" and not horizon_steps:
            raise ValueError(f"schedule {kind!r} needs horizon_steps")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.horizon_steps = horizon_steps
        self.on_unload = on_unload
        self.rewarmup_steps = rewarmup_steps
        self.stage_start = 0
        self.unloads = 0

    def __call__(self, step: int) -> float:
        since = step - self.stage_start
        t = since if self.on_unload == "restart" else step
        f = 1.0
        if self.warmup_steps and t < self.warmup_steps:
            f = (t + 1) / self.warmup_steps
        elif self.kind != "constant":
            progress = min(1.0, (t - self.warmup_steps) / max(1, self.horizon_steps - self.warmup_steps))
            f = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.unloads and self.rewarmup_steps and since < self.rewarmup_steps:
            f *= (since + 1) / self.rewarmup_steps
        return f

    def mark_unload(self, step: int) -> None:
        self.unloads += 1
        self.stage_start = step


def make_scheduler(optimizer, schedule: StageLR) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Apply the lambda at the scheduler's current step now (after an unload)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


# ---------------------------------------------------------------------------- ledger


def numerical_rank(bs: list[torch.Tensor], as_: list[torch.Tensor], rtol: float | None = None) -> int:
    """Rank of sum_t B_t A_t from the stacked factors, via two QRs and a small SVD.

    B_cat (d x n) A_cat (n x k) = Q1 (R1 R2^T) Q2^T with n = sum of ranks, so the rank
    is that of the n x n core. Computed in float64; singular values below
    ``rtol * max(d, k) * eps(fp32) * sigma_max`` count as zero (the factors are fp32).
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


# rows of W merged at a time by PyTorch ops: a 16 MB fp32 buffer. Measured at LLaMA-7B layer shapes
# (2 CPU cores, 3 interleaved rounds): 16 MB blocks merge 1.4-2x faster than 4 MB ones (fewer GEMM
# calls) and 2-3x faster than 64 MB or whole-layer blocks (which fall out of cache).
MERGE_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def merge_into_(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """One stage's merge in place, W <- cast(fp32(W) + B A), block of rows by block of rows.

    Each element is summed in fp32 and cast once to W's dtype, so the result equals
    ``(w.float() + b @ a).to(w.dtype)`` (up to the order of the r products' fp32 sum) while the
    only temporary is one block (no d x k fp32 copies: the merge is one pass over W). A bf16
    weight on the CPU goes through the fused kernel of :mod:`plora_ray.kernels.merge_bf16` where it
    can be built (one read and one write of W); otherwise, and on GPUs, PyTorch ops. The
    unload and the ledger's replay both call this on the same device, so a backbone rebuilt
    from W_0 and the ledger is bit-identical to the one training produced.
    """
    from plora_ray.kernels.merge_bf16 import merge_bf16_

    left, right = (a.T, b.T) if fan_in_fan_out else (b, a)  # W (rows x cols) += left @ right
    left = left.to(device=w.device, dtype=torch.float32)
    right = right.to(device=w.device, dtype=torch.float32)
    if merge_bf16_(w, left, right):
        return w
    rows, cols = w.shape
    step = max(1, MERGE_CHUNK_ELEMENTS // max(cols, 1))
    if w.dtype == torch.float32:  # no cast: one GEMM with beta = 1 on W itself
        for i in range(0, rows, step):
            w[i:i + step].addmm_(left[i:i + step], right)
        return w
    buf = torch.empty((min(step, rows), cols), dtype=torch.float32, device=w.device)
    for i in range(0, rows, step):
        j = min(i + step, rows)
        out = buf[: j - i]
        out.copy_(w[i:j])
        out.addmm_(left[i:j], right)  # one GEMM with beta = 1: fp32(W) + B A, rounded once
        w[i:j].copy_(out)
    return w


def merge_stage(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + B A as a new tensor of W's dtype (:func:`merge_into_` on a copy)."""
    return merge_into_(w.detach().clone(), b, a, fan_in_fan_out)


def _rank_from_grams(gb: torch.Tensor, ga: torch.Tensor, d: int, k: int, rtol: float | None) -> int:
    """Rank of B A from G_B = B^T B and G_A = A A^T (both n x n, float64).

    B = U_B S_B V_B^T and A^T = U_A S_A V_A^T with (V, S^2) the eigen-pairs of the Grams, so
    the singular values of B A are those of S_B V_B^T V_A S_A (n x n). Eigenvalues of a Gram
    carry an absolute error of ~eps64 * lambda_max, i.e. ~1.5e-8 * sigma_max on the
    singular values: far below the fp32-based tolerance, so the rank equals
    :func:`numerical_rank`'s on the same factors.
    """
    lb, vb = torch.linalg.eigh(gb)
    la, va = torch.linalg.eigh(ga)
    core = (lb.clamp_min(0).sqrt()[:, None] * (vb.T @ va)) * la.clamp_min(0).sqrt()[None, :]
    sv = torch.linalg.svdvals(core)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(d, k) * torch.finfo(torch.float32).eps) * sv[0]
    return int((sv > tol).sum())


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16}
SHARD = "stage_{:05d}.safetensors"


class _Shard:
    """One stage's safetensors file, read tensor by tensor with ``os.preadv`` straight into a
    fresh tensor: no mmap, so reading a layer keeps only that layer's bytes resident (page
    cache is not the process's memory)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.header, self.base = header, 8 + n

    def layers(self) -> list[str]:
        """Layer names in the order the unloader merged them (safetensors sorts its keys)."""
        if "layers" in self.metadata:
            return json.loads(self.metadata["layers"])
        seen = {}
        for key in self.header:
            seen.setdefault(key.rsplit(".", 1)[0], None)
        return list(seen)

    def get(self, key: str) -> torch.Tensor:
        meta = self.header[key]
        begin, end = meta["data_offsets"]
        out = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        if end > begin:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [view], self.base + begin)
            finally:
                os.close(fd)
            if got != end - begin:
                raise OSError(f"{self.path}: short read of {key}")
        return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """Shards never change once written: a hard link is a complete copy (a copy across devices)."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class UnloadLedger:
    """Per layer, the fp32 factors merged at each stage: W_T = W_0 + sum_t B_t A_t.

    With a ``directory`` every stage is one append-only safetensors shard there
    (``stage_00001.safetensors``: ``<layer>.B``, ``<layer>.A``), written at the unload
    straight from the factors (no serialised copy); host memory holds no stage once
    :meth:`add_stage` returns, whatever T. Without one
    (tests, small tools) the stages stay in memory. Layers are read back one at a time
    (:meth:`stage_factors`), so replaying W_T or measuring a layer's rank holds one layer's
    factors. In a data-parallel run one rank holds it (the unloader's ``hold_ledger``).
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._stages: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # in memory
        self._paths: list[Path] = []  # on disk, in stage order
        self._readers: dict[int, _Shard] = {}
        self._layers: list[str] = []
        self._lock = threading.Lock()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("stage_*.safetensors")):
                self._paths.append(path)
            if self._paths:
                self._layers = self._shard(0).layers()

    @classmethod
    def temporary(cls) -> "UnloadLedger":
        """A ledger in a fresh temporary directory (``plora-ledger-<pid>-...``), removed when
        the ledger is collected or the process exits; those of processes that died without
        exiting (a killed Ray worker) are removed by the next one created."""
        _remove_stale_ledgers()
        ledger = cls(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-"))
        weakref.finalize(ledger, shutil.rmtree, str(ledger.directory), True)
        return ledger

    # -- writing ------------------------------------------------------------------

    def add_stage(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Append one stage, ``{layer: (B, A)}`` (B already scaled by c s); returns T."""
        if not self._layers:
            self._layers = list(factors)
        if self.directory is None:
            self._stages.append({name: (b.detach().float().cpu().clone(), a.detach().float().cpu().clone())
                                 for name, (b, a) in factors.items()})
            return len(self._stages)
        stage = {name: (b.detach().float().cpu(), a.detach().float().cpu()) for name, (b, a) in factors.items()}
        path = self.directory / SHARD.format(len(self._paths) + 1)
        _write_shard(stage, path)
        self._paths.append(path)
        return len(self._paths)

    # -- reading ------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self._paths) if self.directory is not None else len(self._stages)

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def _shard(self, index: int) -> _Shard:
        with self._lock:
            reader = self._readers.get(index)
        if reader is None:
            reader = _Shard(self._paths[index])
            with self._lock:
                self._readers[index] = reader
        return reader

    def stage_factors(self, layer: str, stages: int | None = None):
        """(B_t, A_t) of ``layer`` for t = 1 .. ``stages`` (all by default), one at a time."""
        n = self.num_stages if stages is None else stages
        for t in range(n):
            if self.directory is None:
                yield self._stages[t][layer]
            else:
                shard = self._shard(t)
                yield shard.get(f"{layer}.B"), shard.get(f"{layer}.A")

    @property
    def factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every stage's factors of every layer (loads the whole ledger: for tests and tools)."""
        return {name: list(self.stage_factors(name)) for name in self._layers}

    def delta(self, layer: str) -> torch.Tensor:
        """The accumulated update (d x k, fp32, in nn.Linear's (out, in) layout)."""
        bs, as_ = zip(*self.stage_factors(layer))
        return torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)

    def rebuild(self, layer: str, w0: torch.Tensor) -> torch.Tensor:
        """W_0 + sum_t B_t A_t in one fp32 pass (not bit-equal to training: see :meth:`replay`)."""
        return w0.float() + self.delta(layer).to(w0.device)

    def replay(self, layer: str, w0: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
        """W_T as training produced it, bit for bit: every stage's merge in order
        (:func:`merge_into_`, as the unload does), on W_0's device, in W_0's dtype."""
        return self.replay_into_(layer, w0.detach().clone(), fan_in_fan_out)

    def replay_into_(self, layer: str, w: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
        """:meth:`replay` in place on ``w`` (which holds W_0)."""
        if layer in self._layers:
            for b, a in self.stage_factors(layer):
                merge_into_(w, b, a, fan_in_fan_out)
        return w

    def rank(self, layer: str, stages: int | None = None, rtol: float | None = None) -> int:
        """Numerical rank of the accumulated update after ``stages`` stages (all by default),
        same rule as :func:`numerical_rank`: from the layer's stacked factors' float64 Grams
        (one layer's factors in memory at a time)."""
        if layer not in self._layers:
            return 0
        bs, as_ = [], []
        for b, a in self.stage_factors(layer, stages):
            bs.append(b.double())
            as_.append(a.double())
        if not bs:
            return 0
        bcat, acat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        del bs, as_
        gb, ga = bcat.T @ bcat, acat @ acat.T
        return _rank_from_grams(gb, ga, bcat.shape[0], acat.shape[1], rtol)

    def ranks(self, stages: int | None = None, rtol: float | None = None) -> dict[str, int]:
        return {name: self.rank(name, stages, rtol) for name in self._layers}

    def nbytes(self) -> int:
        """Bytes of factors held in host memory (0 on disk)."""
        return sum(b.nbytes + a.nbytes for stage in self._stages for b, a in stage.values())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._paths)

    # -- saving -------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """A self-contained copy of the ledger in ``directory`` (one shard per stage): hard
        links to this ledger's shards (they never change), or the shards written now."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.directory is not None and out.resolve() == self.directory.resolve():
            return out
        for old in out.glob("stage_*.safetensors"):
            old.unlink()
        for t in range(self.num_stages):
            dst = out / SHARD.format(t + 1)
            if self.directory is not None:
                _link_or_copy(self._paths[t], dst)
            else:
                _write_shard(self._stages[t], dst)
        return out

    def adopt(self, other: "UnloadLedger") -> None:
        """Take ``other``'s stages as this (empty) ledger's: a resumed run continues appending."""
        if self.num_stages:
            raise RuntimeError("adopt() needs an empty ledger")
        if self.directory is None:
            per_layer = {n: list(other.stage_factors(n)) for n in other.layers}
            self._stages = [{n: per_layer[n][t] for n in other.layers} for t in range(other.num_stages)]
            self._layers = other.layers
            return
        other.save(self.directory)
        self._paths = sorted(self.directory.glob("stage_*.safetensors"))
        self._readers = {}
        self._layers = other.layers

    @classmethod
    def load(cls, path) -> "UnloadLedger":
        """A ledger saved by :meth:`save` (a directory of shards), read in place."""
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no ledger directory (stage_*.safetensors shards)")
        return cls(p)


_TEMP_PREFIX = "plora-ledger-"


def _remove_stale_ledgers() -> None:
    """Remove temporary ledgers whose process is gone (``plora-ledger-<pid>-*``)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*-*"):
        pid = path.name[len(_TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def _write_shard(stage: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """One stage as ``<layer>.B``/``<layer>.A`` fp32 (the layer order in the metadata), in
    the safetensors format (8-byte header length, JSON header padded to 8 bytes, raw
    little-endian data in offset order), each tensor written from its own memory:
    ``safetensors.torch.save_file`` would first copy every tensor into a bytes object, a
    second copy of the stage. Written to a temporary name, then renamed: a shard that
    exists is complete."""
    header: dict = {"__metadata__": {"layers": json.dumps(list(stage))}}
    tensors, offset = [], 0
    for name, (b, a) in stage.items():
        for x, t in (("B", b), ("A", a)):
            t = t.detach().to(torch.float32).contiguous()
            header[f"{name}.{x}"] = {"dtype": "F32", "shape": list(t.shape),
                                    "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
            tensors.append(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)


def _lower_priority() -> None:
    """Run this thread (and the threads it starts) at the lowest CPU priority (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class RankMeter:
    """Measures the accumulated rank of each stage off the unload: one background thread at
    the lowest CPU priority, stage after stage in order, layer by layer from the ledger
    (the exact rule of :meth:`UnloadLedger.rank`). :meth:`submit` returns a Future of
    ``{layer: rank}``."""

    def __init__(self, ledger: UnloadLedger, rtol: float | None = None, background: bool = True):
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


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (identifies a base model's weights)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -------------------------------------------------------------------------- unloader


def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    """peft LoRA layers by a short, stable name (``model.layers.0.self_attn.q_proj``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = module
    return out


def lora_parameters(model: torch.nn.Module, adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    params = []
    for layer in lora_layers(model, adapter).values():
        params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return params


def _seed_for(seed: int, stage: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_lora_a(shape, rank: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """peft's ``reset_lora_parameters`` init of A, drawn from ``generator`` (fp32)."""
    a = torch.empty(shape, dtype=torch.float32)
    if how == "kaiming":
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    elif how == "gaussian":
        torch.nn.init.normal_(a, std=1.0 / rank, generator=generator)
    else:
        raise ValueError(f"unknown init {how!r}")
    return a


def prune_by_magnitude(t: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` fraction of entries of smallest magnitude, in place."""
    n = t.numel()
    keep = n - int(math.floor(ratio * n))
    if keep <= 0:
        t.zero_()
        return
    flat = t.view(-1)
    idx = flat.abs().topk(keep).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    flat.masked_fill_(~mask, 0)


class LocalAccess:
    """How the unloader reads and writes parameters and optimizer state: directly.

    Engines that keep their own copies (DeepSpeed ZeRO: partitioned weights, an fp32 master
    copy and partitioned moments inside the optimizer) provide a subclass; the algorithm
    itself never changes.
    """

    def gathered(self, params: Iterable[torch.nn.Parameter], modify: bool = False):
        return contextlib.nullcontext()

    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full parameter in fp32 (the master copy where one exists)."""
        return param.detach().float()

    def write(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))

    def merge(self, base: torch.nn.Parameter, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool) -> None:
        """W <- W + B A in place on the frozen backbone weight (:func:`merge_into_`)."""
        merge_into_(base.data, b, a, fan_in_fan_out)

    def reset_optimizer_state(self, optimizer, params, policy: str, prune_ratio: float) -> None:
        if policy == "reset":
            reset_adam_state_(optimizer, params)
        elif policy == "prune":
            for p in params:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state.get(p, {}):
                        prune_by_magnitude(optimizer.state[p][key], prune_ratio)


def reset_adam_state_(optimizer, params) -> None:
    """Adam(W)'s state of ``params`` back to that of a fresh optimizer, in place: the
    moments (and ``max_exp_avg_sq``) zeroed and ``step`` set to 0, so the next step is
    bit-identical to a fresh optimizer's first one while the tensors, allocated once,
    are reused (popping the state made the next step allocate them again)."""
    tensors, steps = [], []
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if key == "step":
                if torch.is_tensor(value):
                    steps.append(value)
                else:
                    state[key] = 0
            elif torch.is_tensor(value):
                tensors.append(value)
    if tensors:
        torch._foreach_zero_(tensors)
    if steps:
        torch._foreach_zero_(steps)


def _lap(parts: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    parts[key] += now - since
    return now


class UnloadEvent:
    """One unload. ``ranks`` (per layer, the accumulated update's rank) is measured off the
    unload by a :class:`RankMeter`: reading ``ranks`` (or ``mean_rank``/``max_rank``) waits
    for it; :attr:`ranks_ready` says whether it is there."""

    def __init__(self, stage: int, step: int, samples: int, seconds: float, ranks: dict | None = None,
                 output_change: float | None = None, parts: dict | None = None, pending=None):
        self.stage = stage  # stages completed after this unload (1 for the first)
        self.step = step
        self.samples = samples
        self.seconds = seconds
        self._ranks = dict(ranks or {})
        self._pending = pending  # Future of the ranks
        self.output_change = output_change  # max |logits after - before| / max |before|, if measured
        self.parts = dict(parts or {})  # seconds: merge, ledger, reinit, optimizer, rank (submit)

    @property
    def ranks_ready(self) -> bool:
        return self._pending is None or self._pending.done()

    @property
    def ranks(self) -> dict[str, int]:
        if self._pending is not None:
            self._ranks = self._pending.result()
            self._pending = None
        return self._ranks

    @ranks.setter
    def ranks(self, value: dict[str, int]) -> None:
        self._ranks, self._pending = dict(value), None

    @property
    def mean_rank(self) -> float:
        ranks = self.ranks
        return sum(ranks.values()) / len(ranks) if ranks else 0.0

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def __repr__(self) -> str:
        return (f"UnloadEvent(stage={self.stage}, step={self.step}, samples={self.samples}, "
                f"seconds={self.seconds:.4f}, ranks_ready={self.ranks_ready})")


class PeriodicUnloader:
    """Merges the adapter into the backbone at unload points and resets what PLoRA resets.

    ``optimizer``/``scheduler`` may be None (pure algorithm tests). ``clock`` decides when;
    :meth:`after_step` advances it and unloads when due; :meth:`unload` does it now.
    """

    def __init__(self, model, optimizer=None, scheduler=None, *, clock: UnloadClock | None = None,
                 momentum: float = 0.0, momentum_rule: str = "preserve",
                 optimizer_on_unload: str = "reset", prune_ratio: float = 0.99,
                 init_a: str = "kaiming", seed: int = 0, keep_ledger: bool = True,
                 hold_ledger: bool = True, ledger_on_disk: bool = False, adapter: str = ADAPTER,
                 access: LocalAccess | None = None, rank_in_background: bool = True):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum_rule not in MOMENTUM_RULES:
            raise ValueError(f"momentum_rule must be one of {MOMENTUM_RULES}")
        if optimizer_on_unload not in OPTIMIZER_ON_UNLOAD:
            raise ValueError(f"optimizer_on_unload must be one of {OPTIMIZER_ON_UNLOAD}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clock = clock or UnloadClock()
        self.momentum = momentum
        self.momentum_rule = momentum_rule
        self.optimizer_on_unload = optimizer_on_unload
        self.prune_ratio = prune_ratio
        self.init_a = init_a
        self.seed = seed
        self.adapter = adapter
        self.access = access or LocalAccess()
        self.layers = lora_layers(model, adapter)
        if not self.layers:
            raise ValueError("model has no peft LoRA layers to unload")
        # keep_ledger: the run records its unloads (checkpoints store the ledger instead of
        # the backbone); hold_ledger: this process holds it (one data-parallel rank suffices)
        # ledger_on_disk: its stages go to shards in a temporary directory (host memory O(1) in T)
        self.keeps_ledger = keep_ledger
        self.ledger = None
        if keep_ledger and hold_ledger:
            self.ledger = UnloadLedger.temporary() if ledger_on_disk else UnloadLedger()
        self.meter = (RankMeter(self.ledger, background=rank_in_background)
                      if self.ledger is not None else None)
        self.base_digest = self._digest_base() if keep_ledger else None
        self.stage = 0

    def base_weights(self) -> dict[str, torch.nn.Parameter]:
        return {name: layer.get_base_layer().weight for name, layer in self.layers.items()}

    def _digest_base(self) -> str:
        """Digest of W_0 (the target layers' weights before any unload): a factored
        checkpoint is only valid on the same base model. Collective under ZeRO-3."""
        def tensors():
            for name, w in self.base_weights().items():
                with self.access.gathered([w]):
                    yield name, w.detach().cpu()  # gathered views die with the context
        return weights_digest(tensors())

    @classmethod
    def from_config(cls, model, optimizer, scheduler, plora_cfg, lora_cfg, seed=0, access=None):
        """Under torch.distributed only rank 0 holds the ledger (and measures the rank):
        every rank merges the same factors, so one copy is enough. It is kept on disk."""
        hold = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0
        clock = UnloadClock(plora_cfg.unload_every_samples, plora_cfg.unload_every_steps)
        return cls(model, optimizer, scheduler, clock=clock, momentum=plora_cfg.momentum,
                   momentum_rule=plora_cfg.momentum_rule,
                   optimizer_on_unload=plora_cfg.optimizer_on_unload,
                   prune_ratio=plora_cfg.prune_ratio, init_a=lora_cfg.init_a, seed=seed,
                   keep_ledger=plora_cfg.ledger, hold_ledger=hold, ledger_on_disk=True, access=access,
                   rank_in_background=rank_in_background(plora_cfg.rank_measurement, model))

    def _reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        if self.optimizer is None or self.optimizer_on_unload == "keep":
            return
        self.access.reset_optimizer_state(self.optimizer, params, self.optimizer_on_unload, self.prune_ratio)

    # -- the algorithm ------------------------------------------------------------

    def after_step(self, samples: int) -> UnloadEvent | None:
        """Advance the clock by one optimizer step of ``samples``; unload when due."""
        return self.unload() if self.clock.step(samples) else None

    @torch.no_grad()
    def unload(self) -> UnloadEvent:
        """Merge, re-initialise, reset; the ledger's shard is written and the rank measured
        in background threads, so the cost does not depend on the number of stages."""
        t0 = time.perf_counter()
        parts = dict.fromkeys(("merge", "ledger", "reinit", "optimizer", "rank"), 0.0)
        m = self.momentum
        c = 1.0 - m
        ad = self.adapter
        stage = {}
        for index, (name, layer) in enumerate(self.layers.items()):
            lora_a, lora_b = layer.lora_A[ad].weight, layer.lora_B[ad].weight
            base = layer.get_base_layer().weight
            with self.access.gathered([base, lora_a, lora_b], modify=True):
                t = time.perf_counter()
                a = self.access.read(lora_a)
                b_full = self.access.read(lora_b)
                b = b_full * (c * layer.scaling[ad])
                # fp32 sum, cast once to the backbone dtype: the ledger's replay does the same
                self.access.merge(base, b, a, getattr(layer, "fan_in_fan_out", False))
                t = _lap(parts, "merge", t)
                if self.ledger is not None:  # a may be lora_a itself, re-initialised below
                    stage[name] = (b, a.detach().clone())
                t = _lap(parts, "ledger", t)
                if m == 0.0:
                    g = torch.Generator().manual_seed(_seed_for(self.seed, self.stage, index))
                    new_a = init_lora_a(a.shape, layer.r[ad], self.init_a, g)
                    new_b = torch.zeros_like(b_full)
                elif self.momentum_rule == "preserve":
                    new_a, new_b = a, b_full * m
                else:  # paper
                    new_a, new_b = a * m, b_full * m
                self.access.write(lora_a, new_a)
                self.access.write(lora_b, new_b)
                _lap(parts, "reinit", t)
        t = time.perf_counter()
        if self.ledger is not None:
            self.ledger.add_stage(stage)
        t = _lap(parts, "ledger", t)
        self._reset_optimizer_state(lora_parameters(self.model, ad))
        if self.scheduler is not None:
            for fn in self.scheduler.lr_lambdas:
                if isinstance(fn, StageLR):
                    fn.mark_unload(self.scheduler.last_epoch)
            refresh_lr(self.scheduler)
        t = _lap(parts, "optimizer", t)
        self.stage += 1
        pending = self.meter.submit(self.ledger.num_stages) if self.meter is not None else None
        _lap(parts, "rank", t)
        return UnloadEvent(stage=self.stage, step=self.clock.steps, samples=self.clock.samples,
                           seconds=time.perf_counter() - t0, parts=parts, pending=pending)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "clock": self.clock.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.clock.load_state_dict(state["clock"])

