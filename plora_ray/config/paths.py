"""Where plora_ray keeps what it fetches or builds: one cache root for every kind.

``$PLORA_RAY_CACHE`` or ``~/.cache/plora_ray``; under it ``wheels/``, ``data/``, ``models/``
(:mod:`plora_ray.assets.fetch`), ``datasets/`` (tokenised examples), ``kernels/`` (the fused
merge) and ``torch_extensions/`` (DeepSpeed's JIT-built ops, unless ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PLORA_RAY_CACHE"


def cache_root() -> Path:
    """``$PLORA_RAY_CACHE`` or ``~/.cache/plora_ray``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plora_ray"
