"""The fused bf16 merge kernel (plora_ray/kernels/merge_bf16.py) against PyTorch's fp32 merge."""

import pytest
import torch

from plora_ray.kernels import merge_bf16 as merge_kernel
from plora_ray.core.merge import merge_into_

needs_kernel = pytest.mark.skipif(merge_kernel.kernel(8) is None,
                                  reason="the fused merge kernel cannot be built here (no C compiler or no AVX2)")


@needs_kernel
@pytest.mark.parametrize("rows,cols,rank", [(300, 1037, 8), (257, 4096, 3), (64, 1031, 1)])
def test_fused_merge_equals_the_fp32_merge_cast_once(rows, cols, rank):
    """Tiles of 4 x 16 and their row/column tails: every element is fp32(W) + sum_t L R rounded to
    nearest-even once (at most one bf16 ulp from PyTorch's GEMM, whose fp32 sum order differs,
    and only where that sum sits on a rounding boundary); NaN and infinities pass through."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    w[0, 0], w[rows - 1, cols - 1], w[5, 7] = float("nan"), float("inf"), -float("inf")
    left, right = torch.randn(rows, rank, generator=g) * 0.1, torch.randn(rank, cols, generator=g) * 0.1
    expect = (w.float() + left @ right).to(torch.bfloat16)
    got = w.clone()
    assert merge_kernel.merge_bf16_(got, left, right)
    assert got[0, 0].isnan() and got[rows - 1, cols - 1] == float("inf") and got[5, 7] == -float("inf")
    finite = expect.isfinite()
    differ = (got != expect) & finite
    assert differ.float().mean() < 1e-3
    ulp = (expect.float().abs() * 2.0 ** -7).clamp(min=2.0 ** -133)
    assert ((got.float() - expect.float()).abs()[finite] <= ulp[finite]).all()
    assert got.data_ptr() != w.data_ptr() and not torch.equal(got[finite], w[finite])


@needs_kernel
def test_merge_into_takes_the_kernel_for_large_bf16_cpu_weights_only(monkeypatch):
    calls = []
    real = merge_kernel.kernel
    monkeypatch.setattr(merge_kernel, "kernel", lambda r: calls.append(r) or real(r))
    fused = merge_kernel.merge_bf16_
    b, a = torch.randn(512, 8) * 0.1, torch.randn(8, 256) * 0.1
    w = torch.randn(512, 256).to(torch.bfloat16)
    merge_into_(w.clone(), b, a, fused=fused)
    assert calls == [8]  # looked up once per merge
    calls.clear()
    merge_into_(torch.randn(512, 256), b, a, fused=fused)  # fp32: PyTorch's GEMM on W itself
    merge_into_(torch.randn(8, 8).to(torch.bfloat16), b[:8], a[:, :8], fused=fused)  # below MIN_ELEMENTS
    merge_into_(w.clone(), b, a)  # no fused kernel given: PyTorch ops
    assert calls == []
    fp32 = torch.randn(512, 256)
    assert torch.equal(merge_into_(fp32.clone(), b, a, fused=fused), fp32 + b @ a)


def test_fused_merge_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("PLORA_RAY_FUSED_MERGE", "0")
    monkeypatch.setattr(merge_kernel, "_state", {})
    assert merge_kernel.kernel(8) is None
    w = torch.randn(512, 256).to(torch.bfloat16)
    assert not merge_kernel.merge_bf16_(w, torch.zeros(512, 8), torch.zeros(8, 256))
