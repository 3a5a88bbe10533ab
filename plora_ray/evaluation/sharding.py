"""Evaluation split over the ranks of a distributed run.

Why: with one rank evaluating, the others wait in the next collective; at 7B on the full
MMLU that wait outlasts the 30-minute collective timeout. Here every rank scores every
``world``-th item (strided, so long and short items spread evenly), and the per-item records
are gathered with ``all_gather_object`` back into source order on *every* rank, so all ranks
compute the same metrics.

``lockstep`` (DeepSpeed ZeRO-3): each forward pass all-gathers the partitioned weights, so all
ranks must run the same number of forward calls. Before scoring, the ranks agree on the
largest number of batches any of them needs (one ``all_reduce``); ranks with fewer run dummy
one-token batches whose results are dropped. Generation passes ``synced_gpus=True`` to HF
``generate`` (every rank keeps stepping until all have stopped) and pads the number of
``generate`` calls the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LOCAL", "Shard"]


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    lockstep: bool = False

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world): got rank={self.rank}, world={self.world}")
        if self.world > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"evaluation with world={self.world} needs torch.distributed "
                                 "initialised (init_process_group) on every rank")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def take(self, items: list) -> list:
        """This rank's share: items rank, rank + world, rank + 2*world, ..."""
        return list(items[self.rank::self.world])

    def gather(self, local: list, n: int) -> list:
        """All ranks' ``take`` results merged back into source order (length ``n``), on every rank."""
        if not self.distributed:
            return list(local)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, list(local))
        out = [None] * n
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out

    def agree_count(self, count: int, device) -> int:
        """Under lockstep: the largest ``count`` over ranks (each pads up to it); else ``count``."""
        if not (self.lockstep and self.distributed):
            return count
        import torch.distributed as dist

        t = torch.tensor([count], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


LOCAL = Shard()
