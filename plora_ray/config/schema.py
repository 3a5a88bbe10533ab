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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from plora_ray.config.names import CHAT_TEMPLATES, EMBEDDED_MIXES, HELDOUT_NAMES, Task

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUNDLED_DATASETS = ("tiny-dialogues", *EMBEDDED_MIXES)  # names resolved by plora_ray.run.data


class ConfigError(Exception):
    """A user-facing configuration problem; ``str(err)`` is one line naming field and fix."""


class Strict(BaseModel):
    """Every config model: an unknown key is an error, and so is a bad value set later; no
    number may be inf or nan (``lr: .inf`` would pass ``gt=0`` and fail after a step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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


ROW_FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "question",
              "choices", "answer", "subject", "system")


class SourceConfig(Strict):
    """One training-data source, opened through ``datasets`` (``load_dataset`` /
    ``load_from_disk``) and mapped onto a row shape the loader understands: messages,
    ShareGPT conversations, alpaca instruction/input/output, prompt/completion, or multiple
    choice question/choices/answer."""

    path: str = Field(description="a hub dataset id, a local json/jsonl/parquet/csv/arrow file, a "
                      "save_to_disk folder, a dataset folder, or a bundled name "
                      f"({', '.join(BUNDLED_DATASETS)})")
    name: str | None = Field(None, description="the dataset's configuration (load_dataset's name)")
    split: str = Field("train", description="the split to train on")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="load_dataset's data_files (files inside a hub or folder dataset)")
    columns: dict[Literal[ROW_FIELDS], str] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="row field -> the source's column, e.g. {prompt: question, "
        "completion: answer}; fields: " + ", ".join(ROW_FIELDS))
    where: dict[str, list[str | int | bool]] = Field(
        default_factory=dict, description="keep rows whose column holds one of these values, e.g. "
        "{dataset: [open_orca, code_alpaca]} (before the column map)")
    max_rows: int | None = Field(None, ge=1, description="train on the first N rows only (after where)")


class DataConfig(Strict):
    train_files: list[str] = Field(
        default_factory=lambda: ["tiny-dialogues"],
        min_length=1,
        description="json/jsonl/parquet files (messages, conversations, alpaca or prompt/completion "
        f"rows), or a bundled name: {', '.join(BUNDLED_DATASETS)}; the short form of data.sources",
    )
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="datasets mixed into one training set, in order (each a "
        "hub id, file or folder with split, name, data_files, columns, max_rows); replaces "
        "data.train_files")
    max_length: int = Field(512, ge=8, description="tokens per example (truncated)")
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(6, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    shuffle: bool = True
    group_by_length: bool = Field(
        False, description="length-grouped micro-batches (rows of similar length together: "
        "less padding, faster steps; the step order stays seeded and shuffled)")
    tokenize_cache: bool = Field(
        True, description="tokenise each file once through the datasets cache (every trial of "
        "a sweep reads it back)")
    cache_dir: str | None = Field(
        None, description="where datasets caches raw and tokenised rows; null: "
        "<PLORA_RAY_CACHE or ~/.cache/plora_ray>/datasets")

    @model_validator(mode="after")
    def _one_form(self) -> "DataConfig":
        if self.sources is not None and "train_files" in self.model_fields_set:
            raise ValueError("give data.sources or data.train_files, not both (a file in train_files "
                             "is the source {path: FILE})")
        return self

    def all_sources(self) -> list[SourceConfig]:
        """The sources to train on: data.sources, or one per data.train_files entry."""
        return list(self.sources) if self.sources is not None else [SourceConfig(path=f) for f in self.train_files]

    def paths(self) -> list[str]:
        return [s.path for s in self.all_sources()]

    def embedded(self) -> bool:
        """Whether any source is an embedded mix (built from the benchmarks' training splits)."""
        return any(p in EMBEDDED_MIXES for p in self.paths())


class HeldoutConfig(Strict):
    """Held-out dialogues scored by teacher-forced loss at every checkpoint (``eval/heldout/loss``)."""

    files: list[str] | None = Field(
        None, description="dialogue files (data.train_files formats) or a bundled name "
        f"({', '.join(BUNDLED_DATASETS + HELDOUT_NAMES)}); null: gsm8k-heldout when training on "
        "an embedded mix, else none; []: none")
    fraction: float = Field(0.0, ge=0, lt=1, description="seeded fraction of the training "
                            "examples kept out of training and scored as held-out")
    seed: int = Field(0, description="seed of the fraction split (fixed, so trials of "
                      "different run seeds hold out the same examples)")
    limit: int | None = Field(None, ge=1, description="score only the first N held-out examples")

    @model_validator(mode="after")
    def _files_exist(self) -> "HeldoutConfig":
        for f in self.files or []:
            if f not in BUNDLED_DATASETS + HELDOUT_NAMES and not Path(f).exists():
                raise ValueError(f"file '{f}' not found: give an existing path or a bundled name "
                                 f"({', '.join(BUNDLED_DATASETS + HELDOUT_NAMES)})")
        return self


class EvalConfig(Strict):
    """Benchmarks scored at every checkpoint (defined as lm-evaluation-harness defines them)."""

    tasks: list[Task] = Field(
        default_factory=list, description="empty: no benchmark (the held-out loss may still run)")
    final_only_tasks: list[Task] = Field(
        default_factory=list, description="tasks of eval.tasks scored only at the final "
        "checkpoint (e.g. [gsm8k]: generation is slow); the others run at every checkpoint")
    heldout: HeldoutConfig = HeldoutConfig()
    limit: int | None = Field(20, ge=1, description="items per task (MMLU: spread over subjects); "
                              "null: the whole test set")
    task_limits: dict[Task, int | None] = Field(
        default_factory=dict, description="per-task items, overriding eval.limit (e.g. {gsm8k: 5}: "
        "generation is slow)")
    limit_mode: Literal["first", "sample"] = "first"
    prompt_style: Literal["chat", "plain"] = Field("chat", description="chat: the training template")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="GSM8K generation length")
    gsm8k_items: Literal["auto", "test", "heldout"] = Field(
        "auto", description="GSM8K problems scored: test (the whole 1,319-problem test set, as the "
        "paper and lm-eval), heldout (the 319 the embedded mix never trains on); auto: heldout when "
        "training on an embedded mix, else test. Resolved when the config is built, so config.yaml "
        "and MLflow record which (ids gsm8k-test-<i> / gsm8k-heldout-<i>: two sets never pair)")
    harness: HarnessConfig = Field(
        default_factory=lambda: HarnessConfig(), description="any lm-evaluation-harness task by "
        "name, scored by lm-eval itself on the live model (eval/<task>/<metric>)")

    @model_validator(mode="after")
    def _final_only_in_tasks(self) -> "EvalConfig":
        for t in self.final_only_tasks:
            if t not in self.tasks:
                raise ValueError(f"final_only_tasks names '{t}', which is not in eval.tasks: "
                                 "add it to eval.tasks or remove it")
        for t in self.harness.tasks:
            if t in self.tasks:
                raise ValueError(f"harness.tasks names '{t}', which eval.tasks scores too (both log "
                                 f"eval/{t}/...): keep it in one of them")
        return self


class HarnessConfig(Strict):
    """lm-evaluation-harness tasks scored with ``lm_eval.simple_evaluate`` on the in-memory model
    at checkpoints (``plora_ray.evaluation.harness``); names are checked against lm-eval's
    registry (plus ``include_path``) before any work starts."""

    tasks: list[str] = Field(
        default_factory=list, description="lm-eval task, group or tag names (e.g. [hellaswag, "
        "truthfulqa_mc2]); empty: none")
    include_path: str | None = Field(
        None, description="a folder of your own lm-eval task YAMLs (lm-eval's --include_path; "
        "local data: dataset_path: json, dataset_kwargs: {data_files: ...}); made absolute")
    num_fewshot: int | None = Field(None, ge=0, description="null: each task's own default")
    limit: int | None = Field(None, ge=1, description="first N documents per task (lm-eval's "
                              "--limit); null: all")
    batch_size: int = Field(8, ge=1)
    at: Literal["every", "last"] = Field("every", description="every checkpoint, or the final one only")
    apply_chat_template: bool = Field(False, description="lm-eval's --apply_chat_template")
    bootstrap_iters: int = Field(100000, ge=0, description="lm-eval's bootstrap resamples for the "
                                 "stderr of non-mean metrics (0: none)")

    @model_validator(mode="after")
    def _names_and_path(self) -> "HarnessConfig":
        for t in self.tasks:
            if not t.strip() or "/" in t or t == "heldout":
                raise ValueError(f"harness task name {t!r}: give an lm-eval task, group or tag name "
                                 "(no '/'; 'heldout' is eval.heldout's)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("harness.tasks names a task twice: list each once")
        if self.include_path is not None:
            path = Path(self.include_path).expanduser()
            if not path.is_dir():
                raise ValueError(f"include_path '{self.include_path}' is not a folder: give the folder "
                                 "that holds your task YAMLs")
            resolved = str(path.resolve())
            if resolved != self.include_path:
                self.include_path = resolved  # workers may run in another directory
        return self


class DistributedConfig(Strict):
    """How a run is executed: one process, or N Ray Train workers with DDP or DeepSpeed."""

    workers: int = Field(1, ge=1, description="data-parallel workers (1: no Ray, one process)")
    engine: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="with workers > 1 (or always for deepspeed): torch DDP or DeepSpeed")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="DeepSpeed: optimizer state on the CPU")
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
        if self.eval.gsm8k_items == "auto":  # a pure function of the config: resolved here
            self.eval.gsm8k_items = "heldout" if self.data.embedded() else "test"
        return self

    def samples_per_step(self, world: int) -> int:
        """Sequences in one optimizer step over ``world`` data-parallel ranks."""
        return self.data.micro_batch_size * self.data.gradient_accumulation_steps * world

    @property
    def global_batch_size(self) -> int:
        return self.samples_per_step(self.distributed.workers)


