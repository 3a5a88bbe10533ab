"""``model.dtype: auto``: what this machine trains fast in, decided where a run config is built.

The schema (:mod:`plora_ray.config.schema`) accepts ``auto`` and probes nothing;
:func:`resolve_dtype` replaces it by the concrete dtype, so a run's config.yaml and its MLflow
params say which (``build_run_config`` and ``load_run_config`` call it after validation).
"""

from __future__ import annotations

from plora_ray.config.schema import RunConfig


def fast_bf16_cpu() -> bool:
    """Whether this CPU runs bf16 matmuls through oneDNN (AVX-512, AMX or Arm bf16); without
    it PyTorch falls back to a scalar bf16 GEMM (measured on an AVX2 EPYC: 1.1 GFLOP/s, fp32
    55-125 GFLOP/s)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_dtype(use_gpu: bool) -> str:
    """``model.dtype: auto``: bfloat16 on GPU workers or a CPU with fast bf16, else float32.
    Decided where the config is built (the driver): on a cluster whose CPU nodes differ from
    the driver's, set the dtype explicitly."""
    return "bfloat16" if use_gpu or fast_bf16_cpu() else "float32"


def resolve_dtype(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model.dtype: auto`` replaced by :func:`auto_dtype` (``cfg`` itself when
    the dtype is explicit). The result is validated again, so the checks that depend on the
    dtype (DeepSpeed ZeRO stage 0 with bfloat16) see the real one: raises pydantic's
    ValidationError, which the caller formats (``config.io.build_run_config``)."""
    if cfg.model.dtype != "auto":
        return cfg
    data = cfg.model_dump()
    data["model"]["dtype"] = auto_dtype(cfg.distributed.use_gpu)
    return RunConfig.model_validate(data)
