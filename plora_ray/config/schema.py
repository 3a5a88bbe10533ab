"""Run configuration schema: the single source of defaults, documentation and validation.

A run is described by a YAML file (see ``examples/tiny.yaml``). Every field below is a
config key; nested models are YAML sections. Defaults follow the paper (arXiv
2402.16141, Sec. 4.1): LoRA on q,k,v,o,gate,up,down, AdamW, constant LR 1e-4, beta2 0.99,
global batch 24, r 8, alpha 16.

Pure pydantic: nothing here reads files of its own or probes the hardware. Reading, overrides
and one-line errors are in :mod:`plora_ray.config.io` (``load_run_config``, which turns every
problem into :class:`ConfigError`); ``model.dtype: auto`` is resolved there through
:func:`plora_ray.config.hardware.resolve_dtype`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from plora_ray.config.data import DataConfig
from plora_ray.config.evaluation import EvalConfig
from plora_ray.config.names import CHAT_TEMPLATES
from plora_ray.config.strict import Strict

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(Exception):
    """A user-facing configuration problem; ``str(err)`` is one line naming field and fix."""


class TinyModelConfig(Strict):
    """Shape of the random-init ``tiny`` Llama used by tests and the quick example."""

    hidden_size: int = Field(64, ge=8, description="hidden width (d_model)")
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)


class ModelConfig(Strict):
    name_or_path: str = Field(
        "tiny",
        description="'tiny' (random-init Llama built from `tiny`), a local directory, "
        "or a hub id transformers can load",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the backbone weights; LoRA factors, merges and the ledger "
        "always stay fp32. auto: bfloat16 where bf16 matmuls are fast (GPU workers; a CPU with "
        "AVX-512 or AMX, which PyTorch's oneDNN bf16 path needs), else float32 (an AVX2-only CPU "
        "runs bf16 matmuls ~50x slower than fp32); resolved when the config is built, so the "
        "run's config.yaml and MLflow params say which",
    )
    trust_remote_code: bool = False
    chat_template: str | None = Field(
        None, description="null: the tokenizer's own (ChatML where it has none); "
        f"{', '.join(CHAT_TEMPLATES)} (FastChat's, the paper's; plain: base models, no role "
        "markers); a Jinja string; or a .jinja file")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass "
        "(transformers' gradient checkpointing, non-reentrant): activation memory ~one layer's "
        "instead of all layers', for ~1/3 more compute; unloads stay exact")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="transformers' attention backend: sdpa (PyTorch's fused attention), "
        "flash_attention_2 (needs the flash-attn package and a GPU), eager (plain matmuls)")
    compile: bool = Field(
        False, description="compile each decoder layer for the training steps (regional "
        "torch.compile: one graph reused by every layer; evaluation and unloads run eager). The "
        "first step compiles (~35 s for SmolLM2 on 2 CPU cores, ~6 s from inductor's on-disk cache); "
        "measured 1.20x faster steps in fp32, 1.45x in bf16 (bench/RESULTS.md); losses equal the "
        "eager run's to fp32 rounding and "
        "unloads stay exact. Not with DeepSpeed or gradient checkpointing (untested)")
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale s = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(PAPER_TARGETS), min_length=1)
    init_a: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="re-initialisation of A (peft's kaiming-uniform or gaussian)"
    )


class PLoraConfig(Strict):
    unload_every_samples: int | None = Field(
        None, ge=1, description="unload after this many training samples (paper: 4800)"
    )
    unload_every_steps: int | None = Field(
        None, ge=1, description="unload after this many optimizer steps"
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="momentum m in [0, 1)")
    momentum_rule: Literal["preserve", "paper"] = Field(
        "preserve",
        description="preserve: merge (1-m)sBA, keep msBA in the adapter (B <- mB); "
        "paper: merge (1-m)sBA, scale A and B by m each",
    )
    optimizer_on_unload: Literal["reset", "keep", "prune"] = "reset"
    prune_ratio: float = Field(
        0.99, gt=0, lt=1, description="for optimizer_on_unload=prune: fraction of moment "
        "entries zeroed (smallest magnitude first)"
    )
    scheduler_on_unload: Literal["restart", "continue"] = "restart"
    rewarmup_steps: int = Field(0, ge=0, description="linear LR re-warm-up after each unload")
    ledger: bool = Field(True, description="keep each stage's merged factors (fp32)")
    rank_measurement: Literal["auto", "background", "checkpoint"] = Field(
        "auto", description="when each stage's accumulated rank is measured: background (a "
        "low-priority thread right after the unload) or checkpoint (at the next checkpoint, in "
        "the training thread: no thread shares the cores with the steps; on a few CPU cores "
        "that makes PLoRA's steps as fast as LoRA's); auto: background when the model is on a "
        "GPU (the CPU is idle), checkpoint on CPU")
    measure_output_change: bool = Field(
        False, description="log how much an unload changes the logits of a fixed batch "
        "(two extra forward passes per unload; ~0 for the preserve rule)")


class OptimConfig(Strict):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip; null disables")
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError("each of optim.betas must be in [0, 1)")
        return self


class DistributedConfig(Strict):
    """How a run is executed: one process, or N Ray Train workers with DDP or DeepSpeed."""

    workers: int = Field(1, ge=1, description="data-parallel workers (1: no Ray, one process)")
    engine: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="with workers > 1 (or always for deepspeed): torch DDP or DeepSpeed")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="DeepSpeed: optimizer state on the CPU")
    deepspeed_config: str | None = Field(
        None, description="your own DeepSpeed JSON (buckets, overlap, offload, communication dtype); "
        "merged with what the run config sets (batch sizes, precision, stage, optimizer, clipping): a "
        "key both set to different values is refused, naming both; \"auto\" takes the run config's "
        "value. Read by every worker: on a cluster, a path every node can read")
    use_gpu: bool = Field(False, description="GPU workers (nccl); CPU uses gloo")
    gpus_per_worker: float | None = Field(
        None, gt=0, description="with use_gpu: GPUs each worker reserves (Ray resources); a fraction "
        "below 1 lets workers share a GPU (0.5: two per GPU); above 1 a whole number; default 1")
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the workers of one run are placed on the cluster's nodes (Ray "
        "placement group strategy); STRICT_PACK: all on one node (one trial = one 8-GPU node)")
    max_failures: int = Field(0, ge=-1, description="restarts from the last checkpoint; -1: unlimited")
    storage_path: str | None = Field(None, description="Ray storage (shared on a cluster: a path "
                                     "every node mounts, s3://, gs://); default <output_dir>/ray")

    @field_validator("deepspeed_config")
    @classmethod
    def _deepspeed_json(cls, value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_file():
            raise ValueError(f"file '{value}' not found: give the path of your DeepSpeed JSON")
        return str(p.resolve())  # workers may run in another directory

    @model_validator(mode="after")
    def _deepspeed(self) -> "DistributedConfig":
        if self.deepspeed_config and self.engine != "deepspeed":
            raise ValueError("distributed.deepspeed_config needs distributed.engine: deepspeed (or leave it out)")
        return self

    @model_validator(mode="after")
    def _gpus(self) -> "DistributedConfig":
        g = self.gpus_per_worker
        if g is not None and not self.use_gpu:
            raise ValueError("distributed.gpus_per_worker needs distributed.use_gpu: true (or leave it out)")
        if g is not None and g > 1 and g != int(g):
            raise ValueError(f"distributed.gpus_per_worker {g:g}: Ray takes a fraction below 1 or a "
                             "whole number of GPUs: use e.g. 0.5, 1 or 2")
        return self


class RunConfig(Strict):
    name: str = "plora-run"
    method: Literal["plora", "lora", "full"] = "plora"
    seed: int = Field(0, ge=0, le=2**64 - 1, description="torch / data-order seed (a 64-bit "
                      "unsigned integer)")
    output_dir: str = Field("runs/plora-run", description="where results are written")
    log_every_steps: int = Field(10, ge=1, description="print a step line every N steps")
    diverge_factor: float = Field(
        10.0, gt=1, description="stop as diverged when the loss is NaN/inf or exceeds this "
        "multiple of the first step's loss")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="checkpoint (and evaluate) every N steps (paper: 100); the end "
        "of the run is always checkpointed")
    # output options (rundir.py)
    save_merged: bool = Field(
        True, description="write merged/: the trained model as a Hugging Face model directory "
        "(transformers, lm-eval --model hf, vLLM load it); false: adapter, ledger and checkpoint only")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    plora: PLoraConfig = PLoraConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _unload_point(self) -> "RunConfig":
        p = self.plora
        if p.unload_every_samples is not None and p.unload_every_steps is not None:
            raise ValueError(
                "set only one of plora.unload_every_samples and plora.unload_every_steps"
            )
        if self.method == "plora" and p.unload_every_samples is None and p.unload_every_steps is None:
            raise ValueError(
                "method plora needs an unload point: set plora.unload_every_samples "
                "(paper: 4800) or plora.unload_every_steps"
            )
        d = self.distributed  # model.dtype auto: checked again once resolved (config.hardware)
        if d.engine == "deepspeed" and d.zero_stage == 0 and self.model.dtype == "bfloat16":
            raise ValueError(
                "DeepSpeed ZeRO stage 0 with bfloat16 keeps an fp32 copy that unloading cannot "
                "update: use distributed.zero_stage 1-3, or model.dtype float32")
        if d.offload_optimizer and (d.engine != "deepspeed" or d.zero_stage == 0):
            raise ValueError("distributed.offload_optimizer needs engine deepspeed with zero_stage >= 1")
        if self.model.compile and (d.engine == "deepspeed" or self.model.gradient_checkpointing):
            raise ValueError("model.compile is tested with distributed.engine ddp and no gradient "
                             "checkpointing only: set model.compile: false, or engine ddp without "
                             "model.gradient_checkpointing")
        if self.eval.gsm8k_items == "auto":  # a pure function of the config: resolved here
            self.eval.gsm8k_items = "heldout" if self.data.embedded() else "test"
        return self

    def samples_per_step(self, world: int) -> int:
        """Sequences in one optimizer step over ``world`` data-parallel ranks."""
        return self.data.micro_batch_size * self.data.gradient_accumulation_steps * world

    @property
    def global_batch_size(self) -> int:
        return self.samples_per_step(self.distributed.workers)


