"""Where plora_ray keeps what it fetches or builds: one cache root for every kind.

``$PLORA_RAY_CACHE`` or ``~/.cache/plora_ray``; under it ``wheels/``, ``data/``, ``models/``
(:mod:`plora_ray.assets.fetch`), ``datasets/`` (tokenised examples), ``kernels/`` (the fused
merge), ``torch_extensions/<python>-<environment>/`` (DeepSpeed's JIT-built ops, unless
``TORCH_EXTENSIONS_DIR``) and ``inductor/<vector ISA>/`` (``model.compile``'s graphs and kernels,
unless ``TORCHINDUCTOR_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CACHE_ENV = "PLORA_RAY_CACHE"


def cache_root() -> Path:
    """``$PLORA_RAY_CACHE`` or ``~/.cache/plora_ray``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plora_ray"


def extensions_dir() -> str:
    """Where DeepSpeed JIT-builds its ops (CPU Adam, the shared-memory all-reduce): one folder per
    Python environment under the cache root (an op's build command names its environment's
    include paths, so two virtualenvs sharing one folder would rebuild it, ~20-40 s, at each
    switch), unless ``TORCH_EXTENSIONS_DIR`` is set."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    env = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    return str(cache_root() / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}-{env}")


def use_extensions_dir() -> None:
    """Before DeepSpeed first builds an op in this process: build it in :func:`extensions_dir`
    (torch reads ``TORCH_EXTENSIONS_DIR``), whoever started the process (a Ray worker, a spawned
    gloo test, a benchmark's child)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())


def inductor_cache_dir(isa: str) -> str:
    """Where Inductor keeps ``model.compile``'s graphs and kernels: one folder per CPU vector ISA
    that Inductor generates code for (``isa``, e.g. ``avx2``), unless ``TORCHINDUCTOR_CACHE_DIR``
    names a folder of the user's. Inductor's graph cache key (torch 2.13) omits that ISA: a graph
    cached by an AVX-512 process and loaded by an AVX2 one (``ATEN_CPU_CAPABILITY=avx2``, or nodes
    of two CPU kinds sharing the cache root) ran AVX-512 loops over AVX2 vectors and gave NaN,
    and the reverse corrupted the heap (bench/RESULTS.md)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = cache_root() / "inductor"
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # Inductor writes its default there on first use
    if chosen and Path(chosen).parent != ours and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    folder = "-".join(isa.lower().split())
    return str(ours / ("scalar" if folder in ("", "invalid_vec_isa") else folder))


def use_inductor_cache_dir() -> None:
    """Before this process compiles: Inductor reads and writes :func:`inductor_cache_dir` of the
    ISA it generates code for now (``ATEN_CPU_CAPABILITY`` can lower it)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(str(pick_vec_isa()))
