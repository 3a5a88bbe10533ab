"""``model.compile``: regional compilation of a model's decoder layers for the training steps,
and where Inductor keeps what it compiles (one cache folder per CPU vector ISA)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from plora_ray.config.paths import inductor_cache_dir
from plora_ray.config.schema import ConfigError


def decoder_layers(model, name: str) -> list[torch.nn.Module]:
    """The model's repeated decoder layers (its ``_no_split_modules`` classes' modules), which
    ``model.compile`` compiles; ConfigError naming the model where it names none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not (layers := [m for m in base.modules() if type(m).__name__ in names]):
        raise ConfigError(f"model.compile: {name} names no repeated decoder layer (_no_split_modules) "
                          "to compile: set model.compile: false")
    return layers


def use_inductor_cache_dir() -> None:
    """Before this process compiles: Inductor reads and writes the cache root's folder for the
    CPU vector ISA it generates code for now (``config.paths.inductor_cache_dir``;
    ``ATEN_CPU_CAPABILITY`` can lower the ISA), unless ``TORCHINDUCTOR_CACHE_DIR`` names a folder
    of the user's. Inductor's graph cache key (torch 2.13) omits the ISA: a graph cached by an
    AVX-512 process and loaded by an AVX2 one gave NaN, and the reverse corrupted the heap
    (bench/RESULTS.md)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = inductor_cache_dir(str(pick_vec_isa()))
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # Inductor writes its default there on first use
    if chosen and Path(chosen).parent != Path(ours).parent \
            and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return  # the user's own folder
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = ours


def compile_layers(model, name: str) -> int:
    """Regional compilation (``model.compile``): ``torch.compile`` on each decoder layer in place,
    one graph reused by every layer, dynamic sequence lengths (one compile, not one per length).
    The parameters stay the same tensors, so unloads write into what the graphs read; Inductor's
    on-disk cache (:func:`use_inductor_cache_dir`) makes later runs' first step cheap. Returns
    the number of layers compiled."""
    use_inductor_cache_dir()
    for block in (blocks := decoder_layers(model, name)):
        block.compile(dynamic=True)
    return len(blocks)
