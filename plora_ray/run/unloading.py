"""Builds a run's :class:`~plora_ray.core.unloader.PeriodicUnloader` from its config, with
PLoRA's bookkeeping (the on-disk ledger and the rank meter) and the fused bf16 merge kernel.

Under torch.distributed only rank 0 holds the ledger (and measures the rank): every rank merges
the same factors, so one copy is enough. It is kept on disk, in a temporary directory.
"""

from __future__ import annotations

import torch.distributed as dist

from plora_ray.core.access import LocalAccess
from plora_ray.core.clock import UnloadClock
from plora_ray.core.unloader import ADAPTER, PeriodicUnloader, lora_layers
from plora_ray.kernels.merge_bf16 import merge_bf16_
from plora_ray.ledger.rank import RankMeter, rank_in_background
from plora_ray.ledger.store import UnloadLedger, weights_digest


def digest_base(model, access: LocalAccess, adapter: str = ADAPTER) -> str:
    """Digest of W_0 (the target layers' weights before any unload): a factored checkpoint is
    only valid on the same base model. Collective under ZeRO-3 (every rank must call it)."""
    def tensors():
        for name, layer in lora_layers(model, adapter).items():
            w = layer.get_base_layer().weight
            with access.gathered([w]):
                yield name, w.detach().cpu()  # gathered views die with the context
    return weights_digest(tensors())


def build_unloader(model, optimizer, scheduler, plora_cfg, lora_cfg, seed: int = 0,
                   access: LocalAccess | None = None) -> PeriodicUnloader:
    """The unloader of a ``method: plora`` run. ``access`` defaults to direct access with the
    fused bf16 merge kernel (the ledger's replay uses the same kernel)."""
    hold = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    access = access or LocalAccess(fused=merge_bf16_)
    keep = plora_cfg.ledger
    ledger = UnloadLedger.temporary() if keep and hold else None
    meter = (RankMeter(ledger, background=rank_in_background(plora_cfg.rank_measurement, model))
             if ledger is not None else None)
    clock = UnloadClock(plora_cfg.unload_every_samples, plora_cfg.unload_every_steps)
    return PeriodicUnloader(model, optimizer, scheduler, clock=clock, momentum=plora_cfg.momentum,
                            momentum_rule=plora_cfg.momentum_rule,
                            optimizer_on_unload=plora_cfg.optimizer_on_unload,
                            prune_ratio=plora_cfg.prune_ratio, init_a=lora_cfg.init_a, seed=seed,
                            access=access, ledger=ledger, meter=meter, keeps_ledger=keep,
                            base_digest=digest_base(model, access) if keep else None)
