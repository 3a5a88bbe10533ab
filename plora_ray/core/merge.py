"""One stage's merge of the adapter into the backbone weight, W <- cast(fp32(W) + B A).

Pure PyTorch. A caller that has a faster kernel for some weights (the run layer's fused bf16
CPU kernel, :mod:`plora_ray.kernels.merge_bf16`) passes it as ``fused``; it is tried first.
The unload and the ledger's replay must merge through the same path on the same device
(both pass the same ``fused``) for a backbone rebuilt from W_0 and the ledger to be
bit-identical to the one training produced.
"""

from __future__ import annotations

from typing import Callable

import torch

# rows of W merged at a time by PyTorch ops: a 16 MB fp32 buffer. Measured at LLaMA-7B layer shapes
# (2 CPU cores, 3 interleaved rounds): 16 MB blocks merge 1.4-2x faster than 4 MB ones (fewer GEMM
# calls) and 2-3x faster than 64 MB or whole-layer blocks (which fall out of cache).
MERGE_CHUNK_ELEMENTS = 1 << 22

# fused(w, left, right) -> bool: W <- cast(fp32(W) + left @ right) in place (left, right fp32 on
# W's device), or False with W untouched where it does not apply
FusedMerge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]


@torch.no_grad()
def merge_into_(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool = False,
                fused: FusedMerge | None = None) -> torch.Tensor:
    """One stage's merge in place, W <- cast(fp32(W) + B A), block of rows by block of rows.

    Each element is summed in fp32 and cast once to W's dtype, so the result equals
    ``(w.float() + b @ a).to(w.dtype)`` (up to the order of the r products' fp32 sum) while the
    only temporary is one block (no d x k fp32 copies: the merge is one pass over W). ``fused``,
    where given, is tried first (``fused(w, left, right)`` with W += left @ right); where it
    returns False, PyTorch ops.
    """
    left, right = (a.T, b.T) if fan_in_fan_out else (b, a)  # W (rows x cols) += left @ right
    left = left.to(device=w.device, dtype=torch.float32)
    right = right.to(device=w.device, dtype=torch.float32)
    if fused is not None and fused(w, left, right):
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
