"""A fused CPU kernel for the unload's merge of a bf16 weight: W <- bf16(fp32(W) + L R).

Why: on the CPU the merge of a bf16 backbone in PyTorch ops is three passes over each block of
W (bf16 -> fp32 copy, a K = r GEMM with beta = 1, fp32 -> bf16 copy), 4-17x the memory floor of
one read and one write of W (bench/RESULTS.md, LLaMA-7B layer shapes, two machines). This kernel
does it in one pass: for a tile of 4 rows and 16 columns it accumulates sum_t L[i, t] R[t, j] in
fp32 AVX2 registers (FMA, t in order; r fixed when the kernel is built, so those loops unroll),
adds fp32(W[i, j]) and writes W rounded to nearest-even once, as PyTorch rounds fp32 to bf16
(NaN -> 0x7FC0). R (r x cols, fp32) stays in cache; W is read and written once.

It is plain C (AVX2 + FMA intrinsics, no PyTorch headers), built with the system C compiler on
first use (about a second) into ``$PLORA_RAY_CACHE`` (default ``~/.cache/plora_ray``) under a
name that hashes the source and flags, and called through ctypes, which releases the GIL: the
rows are split over ``torch.get_num_threads()`` Python threads. Where there is no compiler, no
AVX2 or the build fails, :func:`merge_bf16_` returns False and the caller uses PyTorch ops;
``PLORA_RAY_FUSED_MERGE=0`` turns it off. The choice depends only on the machine, so a ledger
replayed on the machine that trained gives the same bits as the unloads did.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from plora_ray.config.paths import cache_root

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline __m256 load_bf16(const uint16_t* p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

static inline void store_bf16(uint16_t* p, __m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

static inline uint16_t round_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* rows [row0, row1) of W (bf16, row stride ldw) += L (rows x r, fp32, row-major) @ R (r x cols) */
void merge_bf16(uint16_t* w, int64_t ldw, const float* L, const float* R,
                int64_t row0, int64_t row1, int64_t cols) {
    const int64_t r = RANK;  /* the LoRA rank, fixed at build time: the t loops unroll */
    int64_t i = row0;
    for (; i + 4 <= row1; i += 4) {
        const float* l = L + i * r;
        int64_t j = 0;
        for (; j + 16 <= cols; j += 16) {  /* 4 rows x 16 columns: 8 accumulators */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            _Pragma("GCC unroll 16") for (int64_t t = 0; t < RANK; ++t) {
                __m256 x = _mm256_loadu_ps(R + t * cols + j), y = _mm256_loadu_ps(R + t * cols + j + 8);
                __m256 s = _mm256_set1_ps(l[t]);
                a0 = _mm256_fmadd_ps(s, x, a0); b0 = _mm256_fmadd_ps(s, y, b0);
                s = _mm256_set1_ps(l[r + t]);
                a1 = _mm256_fmadd_ps(s, x, a1); b1 = _mm256_fmadd_ps(s, y, b1);
                s = _mm256_set1_ps(l[2 * r + t]);
                a2 = _mm256_fmadd_ps(s, x, a2); b2 = _mm256_fmadd_ps(s, y, b2);
                s = _mm256_set1_ps(l[3 * r + t]);
                a3 = _mm256_fmadd_ps(s, x, a3); b3 = _mm256_fmadd_ps(s, y, b3);
            }
            uint16_t* p = w + i * ldw + j;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a0));
            store_bf16(p + 8, _mm256_add_ps(load_bf16(p + 8), b0));
            p += ldw;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a1));
            store_bf16(p + 8, _mm256_add_ps(load_bf16(p + 8), b1));
            p += ldw;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a2));
            store_bf16(p + 8, _mm256_add_ps(load_bf16(p + 8), b2));
            p += ldw;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a3));
            store_bf16(p + 8, _mm256_add_ps(load_bf16(p + 8), b3));
        }
        for (; j + 8 <= cols; j += 8) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t t = 0; t < r; ++t) {
                __m256 x = _mm256_loadu_ps(R + t * cols + j);
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(l[t]), x, a0);
                a1 = _mm256_fmadd_ps(_mm256_set1_ps(l[r + t]), x, a1);
                a2 = _mm256_fmadd_ps(_mm256_set1_ps(l[2 * r + t]), x, a2);
                a3 = _mm256_fmadd_ps(_mm256_set1_ps(l[3 * r + t]), x, a3);
            }
            uint16_t* p = w + i * ldw + j;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a0));
            store_bf16(p + ldw, _mm256_add_ps(load_bf16(p + ldw), a1));
            store_bf16(p + 2 * ldw, _mm256_add_ps(load_bf16(p + 2 * ldw), a2));
            store_bf16(p + 3 * ldw, _mm256_add_ps(load_bf16(p + 3 * ldw), a3));
        }
        for (; j < cols; ++j)
            for (int64_t k = 0; k < 4; ++k) {
                float acc = 0.0f;
                for (int64_t t = 0; t < r; ++t) acc = __builtin_fmaf(l[k * r + t], R[t * cols + j], acc);
                uint16_t* p = w + (i + k) * ldw + j;
                *p = round_bf16(from_bf16(*p) + acc);
            }
    }
    for (; i < row1; ++i) {
        const float* l = L + i * r;
        int64_t j = 0;
        for (; j + 8 <= cols; j += 8) {
            __m256 a0 = _mm256_setzero_ps();
            for (int64_t t = 0; t < r; ++t)
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(l[t]), _mm256_loadu_ps(R + t * cols + j), a0);
            uint16_t* p = w + i * ldw + j;
            store_bf16(p, _mm256_add_ps(load_bf16(p), a0));
        }
        for (; j < cols; ++j) {
            float acc = 0.0f;
            for (int64_t t = 0; t < r; ++t) acc = __builtin_fmaf(l[t], R[t * cols + j], acc);
            uint16_t* p = w + i * ldw + j;
            *p = round_bf16(from_bf16(*p) + acc);
        }
    }
}
"""

FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-ffp-contract=off"]
MIN_ELEMENTS = 1 << 16  # smaller layers: PyTorch ops (call overhead would dominate)
_lock = threading.Lock()
_state: dict = {}


def _build(rank: int):
    if os.environ.get("PLORA_RAY_FUSED_MERGE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = [f"-DRANK={rank}", *FLAGS]
    tag = hashlib.sha256((SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"merge_bf16_r{rank}_{tag}.so"
    try:
        if not lib.is_file():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                src, out = Path(tmp) / "merge.c", Path(tmp) / "merge.so"
                src.write_text(SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
                os.replace(out, lib)  # atomic: workers building at once each rename a whole file
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = dll.merge_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    return fn


def kernel(rank: int):
    """The compiled ``merge_bf16`` for LoRA rank ``rank``, or None where it cannot be had
    (built once per rank and machine)."""
    with _lock:
        if rank not in _state:
            _state[rank] = _build(rank) if 1 <= rank <= 256 else None
        return _state[rank]


def _pool(n: int) -> ThreadPoolExecutor:
    with _lock:
        if _state.get("threads") != n:
            if "pool" in _state:
                _state["pool"].shutdown(wait=False)
            _state["pool"], _state["threads"] = ThreadPoolExecutor(n, thread_name_prefix="plora-merge"), n
        return _state["pool"]


def _takes(w: torch.Tensor) -> bool:
    """Whether the kernel's layout fits ``w``: a large bf16 CPU matrix of unit column stride."""
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2
            and w.stride(1) == 1 and w.numel() >= MIN_ELEMENTS)


@torch.no_grad()
def merge_bf16_(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """W <- bf16(fp32(W) + left @ right) in one pass; False (W untouched) where the kernel
    does not apply (another dtype, device or layout, a small W, or no kernel on this machine)."""
    fn = kernel(left.shape[1]) if _takes(w) else None
    if fn is None:
        return False
    rows, cols = w.shape
    left = left.to(torch.float32).contiguous()
    right = right.to(torch.float32).contiguous()
    n = max(1, min(torch.get_num_threads(), rows // 64))
    bounds = [rows * k // n // 4 * 4 for k in range(n)] + [rows]
    args = (w.data_ptr(), w.stride(0), left.data_ptr(), right.data_ptr())
    if n == 1:
        fn(*args, 0, rows, cols)
    else:
        jobs = [_pool(n).submit(fn, *args, lo, hi, cols) for lo, hi in zip(bounds, bounds[1:])]
        for job in jobs:
            job.result()
    return True
