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
    """Where Inductor keeps ``model.compile``'s graphs and kernels for code of one CPU vector ISA
    (``isa`` as Inductor names it, e.g. ``avx2``): a folder of its own under the cache root
    (``run.compiled.use_inductor_cache_dir``: Inductor's graph cache key omits the ISA)."""
    folder = "-".join(isa.lower().split())
    return str(cache_root() / "inductor" / ("scalar" if folder in ("", "invalid_vec_isa") else folder))
