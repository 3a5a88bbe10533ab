"""Do the data-parallel ranks really hold the same model? A check that can fail.

Each rank hashes what it holds itself, and the digests are compared with one
``all_gather_object``; nothing is gathered or broadcast first (a gathered copy, or rank 0's
copy broadcast to all, is identical on every rank by construction and proves nothing).

What each rank holds, by engine:

* DDP, ZeRO-0/1/2: a full copy of the model in its own dtype (bf16 module weights
  included), the unloaded backbone weights among them: every parameter is hashed.
* ZeRO-1/2 also keep an fp32 master copy partitioned across ranks: partitions differ by
  design, but each rank checks its own fragment against its module copy (the module weight
  is the master cast to the module dtype after every step and every unload write). A
  rank whose master disagrees with its weights (e.g. an unload written to the module but
  not to the master) reports a mismatch.
* ZeRO-3 partitions the weights themselves: no rank holds another rank's partition, so no
  cross-rank comparison of partitions is possible (and an all-gather would show every
  rank the same bytes). What *is* replicated is compared: parameters DeepSpeed keeps whole
  on every rank (``ds_persist``: small ones, below ``stage3_param_persistence_threshold``)
  and buffers. Each rank also checks its own weight partition against its fp32 master
  partition, as above.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def _bytes(t: torch.Tensor):
    t = t.detach().cpu().contiguous().view(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _zero_stage(run) -> int:
    return getattr(run.engine, "stage", -1) if type(run.engine).__name__ == "DeepSpeedEngine" else -1


def _master_agrees(p: torch.nn.Parameter, stage: int) -> bool:
    """This rank's fp32 master fragment, cast to the module dtype, equals its module weight."""
    if not p.requires_grad:
        return True
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        if local is None:
            return True
        part = p.ds_tensor.detach().view(-1)[: local.numel()]
        return torch.equal(local.view(-1).to(part.dtype), part)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # this rank's master partition holds none of p
        return True
    addr = mapping.lp_fragment_address
    lp = p.detach().view(-1).narrow(0, addr.start, addr.numel)
    return torch.equal(mapping.get_hp_fragment().view(-1).to(lp.dtype), lp)


def local_digest(run) -> str:
    """sha256 of what this rank holds that every rank should hold identically (not collective)."""
    stage = _zero_stage(run)
    h = hashlib.sha256()
    consistent = True
    for name, p in run.model.named_parameters():
        if stage == 3:
            if getattr(p, "ds_persist", False):
                h.update(name.encode())
                h.update(_bytes(p.data))
        else:
            h.update(name.encode())
            h.update(_bytes(p))
        if stage >= 1:
            consistent &= _master_agrees(p, stage)
    for name, buf in run.model.named_buffers():
        h.update(name.encode())
        h.update(_bytes(buf))
    return h.hexdigest() if consistent else "master-copy-differs:" + h.hexdigest()


def replicas_identical(run) -> bool:
    """Collective: True when every rank's :func:`local_digest` is the same and no rank's
    master copy disagrees with its weights."""
    digest = local_digest(run)
    digests = [digest]
    if run.world > 1 and dist.is_available() and dist.is_initialized():
        digests = [None] * run.world
        dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1 and not digests[0].startswith("master-copy-differs")
