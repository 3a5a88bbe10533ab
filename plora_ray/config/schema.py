"""Run configuration: the single source of defaults, documentation and validation errors.

A run is described by a YAML file (see ``examples/tiny.yaml``). Every field below is a
config key; nested models are YAML sections. Defaults follow the paper (arXiv
2402.16141, Sec. 4.1): LoRA on q,k,v,o,gate,up,down, AdamW, constant LR 1e-4, beta2 0.99,
global batch 24, r 8, alpha 16.

Bad input never raises a traceback at the user: :func:`load_run_config` turns every
problem into :class:`ConfigError`, whose message is one line naming the field and the fix.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
from plora_ray.config.names import EMBEDDED_MIXES, Task  # noqa: F401  (EMBEDDED_MIXES: re-exported)
BUNDLED_DATASETS = ("tiny-dialogues", *EMBEDDED_MIXES)  # names resolved by plora_ray.run.data


class ConfigError(Exception):
    """A user-facing configuration problem; ``str(err)`` is one line naming field and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Shape of the random-init ``tiny`` Llama used by tests and the quick example."""

    hidden_size: int = Field(64, ge=8, description="hidden width (d_model)")
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(1024, ge=16)


class ModelConfig(_Section):
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
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale s = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(PAPER_TARGETS), min_length=1)
    init_a: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="re-initialisation of A (peft's kaiming-uniform or gaussian)"
    )


class PLoraConfig(_Section):
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


class OptimConfig(_Section):
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


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=lambda: ["tiny-dialogues"],
        min_length=1,
        description="json/jsonl/parquet files (messages, conversations or alpaca rows), "
        f"or a bundled name: {', '.join(BUNDLED_DATASETS)}",
    )
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


HELDOUT_NAMES = ("gsm8k-heldout",)  # the 319 GSM8K problems the embedded mix never trains on


class HeldoutConfig(_Section):
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


class EvalConfig(_Section):
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

    @model_validator(mode="after")
    def _final_only_in_tasks(self) -> "EvalConfig":
        for t in self.final_only_tasks:
            if t not in self.tasks:
                raise ValueError(f"final_only_tasks names '{t}', which is not in eval.tasks: "
                                 "add it to eval.tasks or remove it")
        return self


class DistributedConfig(_Section):
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


class RunConfig(_Section):
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
        d = self.distributed
        if self.model.dtype == "auto":
            self.model.dtype = auto_dtype(d.use_gpu)
        if d.engine == "deepspeed" and d.zero_stage == 0 and self.model.dtype == "bfloat16":
            raise ValueError(
                "DeepSpeed ZeRO stage 0 with bfloat16 keeps an fp32 copy that unloading cannot "
                "update: use distributed.zero_stage 1-3, or model.dtype float32")
        if d.offload_optimizer and (d.engine != "deepspeed" or d.zero_stage == 0):
            raise ValueError("distributed.offload_optimizer needs engine deepspeed with zero_stage >= 1")
        return self

    @property
    def global_batch_size(self) -> int:
        d = self.data
        return d.micro_batch_size * d.gradient_accumulation_steps * self.distributed.workers


# ---------------------------------------------------------------------------- loading


def _known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_known_paths(ann, path + "."))
    return out


# names researchers bring from transformers / peft / other trainers
ALIASES = {"learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "batch_size": "micro_batch_size",
           "per_device_train_batch_size": "micro_batch_size", "num_train_epochs": "epochs",
           "model_name_or_path": "name_or_path", "gradient_accumulation": "gradient_accumulation_steps",
           "lr_scheduler_type": "scheduler", "warmup": "warmup_steps", "target_layers": "target_modules"}


def nearest_key(path: str, model: type[BaseModel] = None) -> str | None:
    """The valid dotted key closest to ``path`` (for 'did you mean' messages)."""
    known = _known_paths(model or RunConfig)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    alias = ALIASES.get(path.rsplit(".", 1)[-1])
    if alias and parent + alias in known:
        return parent + alias
    same_level = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
    match = difflib.get_close_matches(path, same_level, n=1, cutoff=0.5) or difflib.get_close_matches(
        path, known, n=1, cutoff=0.6
    )
    return match[0] if match else None


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    etype = err["type"]
    if etype == "extra_forbidden":
        hint = nearest_key(loc, model)
        fix = f"did you mean '{hint}'?" if hint else "remove it"
        return f"unknown key '{loc}': {fix}"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    field = f"field '{loc}'" if loc else "config"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{field}: {msg}{got_s}"


def format_validation_error(exc: ValidationError, model: type[BaseModel] = None) -> str:
    errors = exc.errors()
    first = _describe(errors[0], model or RunConfig)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return first + more


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. lora.rank=4)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def apply_override(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ConfigError (one line) for a binary or undecodable file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror}): check its "
                          "permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text {what} file (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8): give the {what} file itself") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text {what} file (it holds NUL bytes): give the {what} "
                          "file itself")
    return text


def read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file; ConfigError (one line) for a missing, binary or
    invalid file, a top level that is not a mapping, or a key given twice in one mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found: check the path")
    try:
        data = yaml.load(read_text_file(p, "YAML"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{p} line {exc.line}: key '{exc.key}' is given twice in the same mapping "
                          "(the later one would silently win): keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{p}{where}: not valid YAML ({' '.join(str(reason).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (got {type(data).__name__})")
    return data


def build_run_config(data: dict, source: str = "config") -> RunConfig:
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None
    for f in cfg.data.train_files:
        if f not in BUNDLED_DATASETS and not Path(f).exists():
            raise ConfigError(
                f"{source}: field 'data.train_files': file '{f}' not found: give an existing "
                f"path or a bundled name ({', '.join(BUNDLED_DATASETS)})"
            )
    if cfg.model.name_or_path != "tiny":
        looks_local = cfg.model.name_or_path.startswith((".", "/", "~"))
        if looks_local and not Path(cfg.model.name_or_path).expanduser().exists():
            raise ConfigError(
                f"{source}: field 'model.name_or_path': directory '{cfg.model.name_or_path}' "
                "not found: give a model directory, a hub id, or 'tiny'"
            )
    return cfg


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read, override (``key=value``) and validate a run YAML; raises ConfigError."""
    data = read_yaml(path)
    for item in overrides:
        apply_override(data, *parse_override(item))
    return build_run_config(data, source=str(path))
