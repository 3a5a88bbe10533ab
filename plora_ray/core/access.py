"""How the unloader reads and writes parameters and optimizer state.

:class:`LocalAccess` does it directly on the tensors. Engines that keep their own copies
(DeepSpeed ZeRO: partitioned weights, an fp32 master copy and partitioned moments inside the
optimizer) subclass it; the algorithm itself never changes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from plora_ray.core.merge import FusedMerge, merge_into_


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


class LocalAccess:
    """How the unloader reads and writes parameters and optimizer state: directly.

    ``fused``: an optional merge kernel tried first by :meth:`merge` (see
    :func:`~plora_ray.core.merge.merge_into_`); the run layer passes the fused bf16 CPU one.
    Engines that keep their own copies (DeepSpeed ZeRO: partitioned weights, an fp32 master
    copy and partitioned moments inside the optimizer) provide a subclass; the algorithm
    itself never changes.
    """

    fused: FusedMerge | None = None

    def __init__(self, fused: FusedMerge | None = None):
        self.fused = fused

    def gathered(self, params: Iterable[torch.nn.Parameter], modify: bool = False):
        return contextlib.nullcontext()

    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full parameter in fp32 (the master copy where one exists)."""
        return param.detach().float()

    def write(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))

    def merge(self, base: torch.nn.Parameter, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool) -> None:
        """W <- W + B A in place on the frozen backbone weight (:func:`merge_into_`)."""
        merge_into_(base.data, b, a, fan_in_fan_out, fused=self.fused)

    def reset_optimizer_state(self, optimizer, params, policy: str, prune_ratio: float) -> None:
        if policy == "reset":
            reset_adam_state_(optimizer, params)
        elif policy == "prune":
            for p in params:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state.get(p, {}):
                        prune_by_magnitude(optimizer.state[p][key], prune_ratio)
