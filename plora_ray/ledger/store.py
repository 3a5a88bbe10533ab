"""The unload ledger on disk: every stage's merged factors, so W_T = W_0 + sum_t B_t A_t can be
rebuilt exactly from W_0.

Per layer the ledger keeps each stage's merged factors (c s B_t, A_t) in fp32, one append-only
safetensors shard per stage (host memory: the stage being written, inline at the unload), read
back layer by layer. Replaying it merges stage by stage through the same merge as the unload
(:func:`~plora_ray.core.merge.merge_into_` with the fused bf16 CPU kernel of
:mod:`plora_ray.kernels.merge_bf16`), so W_0 + the ledger is bit-identical to the trained
backbone on the machine that trained. Also here: temporary ledger directories (and the removal
of those whose process died) and :func:`weights_digest`, which identifies a base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Iterable

import torch

from plora_ray.core.merge import FusedMerge, merge_into_
from plora_ray.kernels.merge_bf16 import merge_bf16_
from plora_ray.ledger.rank import _rank_from_grams

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
    factors. In a data-parallel run one rank holds it
    (:func:`plora_ray.run.unloading.build_unloader`).
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

    def replay(self, layer: str, w0: torch.Tensor, fan_in_fan_out: bool = False,
               fused: FusedMerge | None = merge_bf16_) -> torch.Tensor:
        """W_T as training produced it, bit for bit: every stage's merge in order
        (:func:`merge_into_` with the same ``fused`` kernel as the unload: the run layer's
        access passes the fused bf16 one), on W_0's device, in W_0's dtype."""
        return self.replay_into_(layer, w0.detach().clone(), fan_in_fan_out, fused)

    def replay_into_(self, layer: str, w: torch.Tensor, fan_in_fan_out: bool = False,
                     fused: FusedMerge | None = merge_bf16_) -> torch.Tensor:
        """:meth:`replay` in place on ``w`` (which holds W_0)."""
        if layer in self._layers:
            for b, a in self.stage_factors(layer):
                merge_into_(w, b, a, fan_in_fan_out, fused=fused)
        return w

    def rank(self, layer: str, stages: int | None = None, rtol: float | None = None) -> int:
        """Numerical rank of the accumulated update after ``stages`` stages (all by default),
        the rule of :func:`~plora_ray.ledger.rank._rank_from_grams`: from the layer's stacked factors' float64 Grams
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


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (identifies a base model's weights)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
