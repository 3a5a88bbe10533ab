"""Each GPU's peak memory for a run, from the model's config alone (no weights): the memory-fit
check before launch (``sweep/preflight.py``) and ``--dry-run``'s per-trial estimate.

    from plora_ray.run.memory import estimate
    print(estimate(cfg).summary(80))   # memory per GPU: 31.2 GiB of 80 (weights 12.6, states ...)

What one worker holds (bytes; P the base's parameters, T the trainable ones, N the workers,
p the backbone dtype's size):

* **weights**: P x p; LoRA factors fp32 under DDP (peft keeps adapters fp32), cast to the
  backbone dtype by DeepSpeed (its fp32 master copy is in the states); ZeRO-3 partitions all of
  them (P x p / N) and gathers a layer at a time (DeepSpeed's "largest layer" working set; with
  N > 1 also what stays gathered from forward to backward, up to ``stage3_max_live_parameters``).
* **states**: AdamW's two moments and DeepSpeed's fp32 master copy (and ZeRO-3's fp32 gradient
  partition), partitioned by the ZeRO stage: bf16 ZeRO-2/3 through DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``, given
  the trainable count), fp32 by the same byte counts with 4-byte 16-bit copies; DDP keeps the
  moments in the parameters' dtype. ``offload_optimizer``: on the CPU. **grads**: the 16-bit
  gradients (ZeRO-2: a 1/N partition), built up while the backward pass frees activations
  (together with them under gradient accumulation).
* **activations**: per decoder layer and token, what autograd saves in a Llama-like decoder
  (RMSNorms' fp32 inputs, the projections' inputs where a weight there trains, attention's q,
  k, v and output (sdpa, flash_attention_2; eager also its S x S probabilities), the MLP's gate,
  up and SiLU outputs, peft's fp32 input copies where the adapter dtype differs), times the
  layers; with ``model.gradient_checkpointing`` only each layer's input plus one layer
  recomputed. Plus the backward pass's transient gradients and the padding mask.
* **logits**: only labelled positions are projected (``run/loss.py``); bounded by every
  position of a row being labelled: logits and their gradient, B x S x V x p each, and the
  loss's fp32 chunks (full fine-tuning: also lm_head's weight gradient).
* **buffers**: DeepSpeed's gradient reduce bucket (``reduce_bucket_size`` elements; ZeRO-1/2:
  the previous one too while gradient views of it live, twice that with ``overlap_comm``; read
  from ``distributed.deepspeed_config`` where given), DDP's gradient buckets (a copy of the
  gradients).
* **between steps** (not during one): PLoRA's unload (the stage's factors in fp32 before the
  ledger takes them to disk, one merge block; the ledger itself is on disk, no copy of W_0 is
  kept), the optimizer step (gradients and its temporaries), and evaluation at checkpoints
  (generation's KV cache, lm-eval's logits; bounded by ``data.max_length`` per row).
* **runtime**: on GPU workers, CUDA context, NCCL and allocator slack that torch does not count
  (:data:`CUDA_RESERVE`).

Peak: weights + states + buffers + the larger of (activations + logits, grads, between steps),
plus runtime. Measured against real CPU steps: ``bench/memory_fit.py``, ``bench/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, field

from plora_ray.config.schema import ConfigError, ModelConfig, RunConfig
from plora_ray.core.merge import MERGE_CHUNK_ELEMENTS
from plora_ray.run.loss import CHUNK_BYTES

GIB = 2**30
CUDA_RESERVE = 1.0 * GIB  # CUDA context (~0.5 GiB on an A100), NCCL buffers, allocator slack
# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py), elements
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
               "contiguous_gradients": True}
# where each Llama-like projection reads its input from (for what autograd keeps of it)
ROLES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}
# LLaMA-7B's architecture (huggyllama/llama-7b's config.json): the paper's model, for the fit
# figures of search_spaces/paper and the tests, where no checkpoint is at hand
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, read off its meta-device skeleton."""

    params: int  # every parameter once (tied ones once)
    largest_layer: int  # most parameters of one module (DeepSpeed's model_to_params)
    linears: tuple  # (name, in_features, out_features) of every linear layer
    hidden: int  # and the rest of the decoder's config: MLP width, layers, heads, KV heads,
    intermediate: int  # head dimension, vocabulary
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@functools.lru_cache(maxsize=32)
def _shape(model_json: str) -> Shape:
    import torch

    from plora_ray.run.models import model_skeleton

    skeleton = model_skeleton(ModelConfig.model_validate_json(model_json))
    c = skeleton.config
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in skeleton.modules())
    linears = tuple((n, m.in_features, m.out_features) for n, m in skeleton.named_modules()
                    if isinstance(m, torch.nn.Linear))
    heads = c.num_attention_heads
    return Shape(params=sum(p.numel() for p in skeleton.parameters()), largest_layer=largest,
                 linears=linears, hidden=c.hidden_size,
                 intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                 layers=c.num_hidden_layers, heads=heads,
                 kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                 head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size)


def model_shape(model: ModelConfig) -> Shape:
    """The :class:`Shape` of ``model`` (cached per model config: a 7B skeleton takes ~1 s)."""
    return _shape(model.model_dump_json())


def targeted(shape: Shape, targets: list[str]) -> list[tuple[str, int, int]]:
    """The linear layers LoRA wraps for ``targets`` (peft's match: the name or its last parts)."""
    return [(n, i, o) for n, i, o in shape.linears if any(n == t or n.endswith("." + t) for t in targets)]


def trainable_params(cfg: RunConfig, shape: Shape) -> int:
    """Parameters that train: all for ``full``, else r (in + out) per wrapped layer."""
    return shape.params if cfg.method == "full" else sum(
        cfg.lora.rank * (i + o) for _, i, o in targeted(shape, cfg.lora.target_modules))


@dataclass
class Estimate:
    """One worker's peak, in bytes, by part (the module docstring says what each holds)."""

    weights: float
    states: float  # optimizer moments and fp32 master copy: held all the time
    grads: float  # gradients: built up during the backward pass, freed after the step
    activations: float
    logits: float
    buffers: float
    between_steps: float
    runtime: float
    workers: int
    accumulating: bool = False  # gradient accumulation: a micro-batch's activations meet gradients
    trainable: int = 0
    parts: dict = field(default_factory=dict)  # what between_steps is made of

    @property
    def step(self) -> float:
        """Peak during a forward/backward pass: activations are freed as gradients are made."""
        held = self.weights + self.states + self.buffers
        if self.accumulating:
            return held + self.grads + self.activations + self.logits
        return held + max(self.activations + self.logits, self.grads)

    total = property(lambda self: max(self.step, self.weights + self.states + self.buffers
                                      + self.between_steps) + self.runtime)

    def summary(self, capacity_gib: float | None = None, what: str = "GPU") -> str:
        unit, scale = ("GiB", GIB) if self.total >= GIB or capacity_gib else ("MiB", 2**20)
        of = f" of {capacity_gib:g}" if capacity_gib else ""
        parts = ", ".join(f"{k} {v / scale:.1f}" for k, v in (
            ("weights", self.weights), ("states", self.states), ("grads", self.grads),
            ("activations", self.activations), ("logits", self.logits), ("buffers", self.buffers),
            ("between steps", self.between_steps), ("runtime", self.runtime)) if v)
        return f"memory per {what}: {self.total / scale:.1f} {unit}{of} ({parts})"


def _deepspeed_estimators():
    """DeepSpeed's two model-state estimators, imported without its accelerator auto-detection
    printing a line to stdout (it picks what it would pick anyway)."""
    unset = "DS_ACCELERATOR" not in os.environ
    if unset:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    finally:
        if unset:
            os.environ.pop("DS_ACCELERATOR", None)
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def user_zero_config(cfg: RunConfig) -> dict:
    """``zero_optimization`` of ``distributed.deepspeed_config`` merged over DeepSpeed's defaults
    (a missing or unreadable file: the defaults; preflight reports the file itself)."""
    zero, path = dict(DS_DEFAULTS), cfg.distributed.deepspeed_config
    if path:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            given = json.loads(open(os.path.expanduser(path)).read()).get("zero_optimization") or {}
            zero.update({k: v for k, v in given.items() if not isinstance(v, str)})  # "auto": default
    return zero


def model_states(cfg: RunConfig, shape: Shape, workers: int) -> dict[str, float]:
    """Per worker, bytes: weights, states (moments, master), grads, buffers and the optimizer
    step's temporaries (``step``)."""
    d, n = cfg.distributed, workers
    p = 2 if cfg.model.dtype == "bfloat16" else 4
    full, trainable = cfg.method == "full", trainable_params(cfg, shape)
    frozen = 0 if full else shape.params
    if d.engine == "ddp" or d.zero_stage == 0:  # torch AdamW on the parameters (ZeRO-0: fp32 only)
        t = 4 if d.engine == "deepspeed" or not full else p  # peft keeps adapters fp32
        return {"weights": frozen * p + trainable * t, "states": 2 * trainable * t, "grads": trainable * t,
                "buffers": trainable * t if n > 1 else 0,  # DDP's reducer buckets: a copy of the gradients
                "step": trainable * t}  # foreach AdamW's temporaries
    zero = user_zero_config(cfg)
    offload = d.offload_optimizer or (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    stage, on_gpu = d.zero_stage, 0 if offload else 1
    # the step's temporaries (measured): fp32 gradients, AdamW's, the updated 16-bit partition
    step = (4 + 4 + p) * trainable / n * on_gpu
    bucket = zero["reduce_bucket_size"] if zero.get("contiguous_gradients", True) or offload else 0
    if stage in (1, 2):
        # 16-bit grads (partitioned at stage 2; stage 1 keeps full fp32 ones), the fp32 master
        # and moments partitioned; the fp32 grad partition is made at the step
        grads = p * trainable / n if stage == 2 else 4 * trainable
        if stage == 2 and p == 2:  # DeepSpeed's count: 2 (params) + 18/N (2 + 4 + 4 + 8)
            z2, _ = _deepspeed_estimators()
            model = z2(trainable, num_gpus_per_node=n, num_nodes=1, cpu_offload=offload)[1]
            states = model - 2 * trainable - grads - 4 * trainable / n * on_gpu
        else:
            states = (4 + 8) * trainable / n * on_gpu
        # the reduce bucket, and the previous one while gradient views of it live (measured);
        # twice that with overlap_comm (DeepSpeed's default: on at stage 3 only)
        buffers = 2 * bucket * (4 if stage == 1 else p) * (2 if zero.get("overlap_comm") else 1)
        return {"weights": (frozen + trainable) * p, "states": max(states, 0.0), "grads": grads,
                "buffers": buffers, "step": step}
    offload_param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    gathered = 2 * p * shape.largest_layer  # a layer gathered (and its gradient), as DeepSpeed counts
    live = 0  # with N > 1 (measured): layers kept gathered from forward to backward (up to
    if n > 1:  # stage3_max_live_parameters, at least the prefetch bucket), and a layer's fp32 gradient
        most = max(zero["stage3_max_live_parameters"], zero["stage3_prefetch_bucket_size"])
        live = p * min(most, shape.params) * (1 - 1 / n) + 4 * shape.largest_layer
    weights = (0 if offload_param else (frozen + trainable) * p / n) + gathered + live
    if p == 2:  # DeepSpeed's count: 4 x largest layer + 18/N (2 + 4 + 4 + 8), all held
        _, z3 = _deepspeed_estimators()
        model = z3(trainable, shape.largest_layer, num_gpus_per_node=n, num_nodes=1, cpu_offload=offload,
                   cpu_offload_params=offload_param, zero_init=True)[1]
        states = model - gathered - (0 if offload_param else 2 * trainable / n)
    else:
        states = (4 + 4 + 8) * trainable / n * on_gpu
    return {"weights": weights, "states": max(states, 0.0), "grads": 0.0, "buffers": bucket * p, "step": step}


def layer_bytes(cfg: RunConfig, shape: Shape, p: int, adapter: int) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
    h, i, hd = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    attn, full = cfg.model.attn_implementation, cfg.method == "full"
    mine = [] if full else [(n.rsplit(".", 1)[-1], i_, o_) for n, i_, o_ in targeted(shape, cfg.lora.target_modules)
                            if ".layers.0." in n]  # one decoder layer's adapters
    # a projection's input is kept where its weight trains, or (uncast) for lora_A's gradient
    roles = {ROLES.get(name, "other") for name, _, _ in mine} if adapter == p else set()
    b = 2 * 4 * h  # the two RMSNorms' fp32 inputs
    b += p * h * (full or "attn_in" in roles)  # q/k/v's input (the normed hidden state)
    kv_saved = kv if attn == "flash_attention_2" else q  # sdpa/eager repeat k, v to every head under a mask
    b += p * (2 * q + 2 * kv_saved) + 4 * shape.heads  # attention's q, k, v, output; log-sum-exp
    b += p * q * (full or "attn_out" in roles)  # o_proj's input (the heads' output made contiguous)
    b += p * h * (full or "mlp_in" in roles)  # gate/up's input
    b += 3 * p * i + p * i * (full or "mlp_out" in roles)  # gate, up, SiLU outputs; down's input
    for name, in_, _ in mine:  # peft: lora_A's output; its input cast to the adapter's dtype
        b += cfg.lora.rank * adapter + (4 * in_ if adapter != p else 0)
        b += in_ * (1 + adapter) if cfg.lora.dropout else 0  # dropout's mask and output
        b += p * in_ if ROLES.get(name) is None and adapter == p else 0  # a layer of unknown role: its input
    return b


def activations(cfg: RunConfig, shape: Shape, p: int, adapter: int) -> tuple[float, float]:
    """(activations, logits) of one micro-batch at its peak, bytes."""
    mb, s = cfg.data.micro_batch_size, cfg.data.max_length
    tokens, attn, full = mb * s, cfg.model.attn_implementation, cfg.method == "full"
    layer = tokens * layer_bytes(cfg, shape, p, adapter)
    if attn == "eager":  # softmax probabilities (fp32, then cast) per head and query
        layer += mb * shape.heads * s * s * (4 + p)
    mask = 0 if attn == "flash_attention_2" else mb * s * s * (p if attn == "eager" else 1)
    transient = tokens * (2 * p * shape.intermediate + 2 * 4 * shape.hidden)  # backward's grads in flight
    head = tokens * (4 + p) * shape.hidden + (tokens * p * shape.hidden if full else 0)
    logits_elems = tokens * shape.vocab  # bound: every position labelled
    logits = 2 * logits_elems * p + 3 * min(CHUNK_BYTES, 4 * logits_elems)
    logits += shape.vocab * shape.hidden * p if full else 0  # lm_head's weight gradient
    if cfg.model.gradient_checkpointing:
        acts = shape.layers * tokens * p * shape.hidden + layer + transient
        return mask + head + acts, logits
    return mask + head + shape.layers * layer + transient, logits


def between_steps(cfg: RunConfig, shape: Shape, p: int, trainable: int, states: dict) -> dict:
    """What a worker allocates between steps (no activations then), bytes by part."""
    parts = {"optimizer step": states["grads"] + states["step"]}  # (grads: held until the step)
    if cfg.method == "plora":  # the stage's (c s B, A) fp32 copies and DeepSpeed's fp32 reads
        widest = max((i * o for _, i, o in targeted(shape, cfg.lora.target_modules)), default=0)
        unload = 8 * trainable + (4 * min(MERGE_CHUNK_ELEMENTS, widest) if p != 4 else 0)  # a merge block
        if cfg.distributed.engine == "deepspeed" and cfg.distributed.zero_stage == 3:
            unload += p * shape.largest_layer
        if cfg.plora.measure_output_change:  # two fp32 logits of the probe batch
            unload += cfg.data.micro_batch_size * cfg.data.max_length * shape.vocab * (8 + p)
        parts["unload"] = unload
    e, s = cfg.eval, cfg.data.max_length
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * p  # per cached token
    if e.tasks:  # generation (GSM8K) and scoring share a KV cache of the batch's rows
        parts["evaluation"] = e.batch_size * (s + e.max_new_tokens) * kv + e.batch_size * shape.vocab * 4
    if e.harness.tasks:  # lm-eval: full logits and their log-softmax over a batch
        harness = e.harness.batch_size * s * (shape.vocab * (p + 4) + kv)
        parts["evaluation"] = max(parts.get("evaluation", 0), harness)
    return parts


def estimate(cfg: RunConfig, workers: int | None = None) -> Estimate:
    """One worker's peak memory for ``cfg`` on ``workers`` data-parallel workers (default
    ``distributed.workers``). ConfigError (one line) if the model's config cannot be read."""
    n = workers or cfg.distributed.workers
    shape = model_shape(cfg.model)
    p = 2 if cfg.model.dtype == "bfloat16" else 4
    st = model_states(cfg, shape, n)
    trainable = trainable_params(cfg, shape)
    adapter = p if (cfg.distributed.engine == "deepspeed" or cfg.method == "full") else 4
    acts, logits = activations(cfg, shape, p, adapter)
    parts = between_steps(cfg, shape, p, trainable, st)
    runtime = CUDA_RESERVE if cfg.distributed.use_gpu else 0.0
    return Estimate(st["weights"], st["states"], st["grads"], acts, logits, st["buffers"], max(parts.values()),
                    runtime, n, cfg.data.gradient_accumulation_steps > 1, trainable, parts)


def gpu_memory_present() -> float | None:
    """GiB of the smallest GPU this machine has (None without one): nvidia-smi's total (no
    CUDA context is made in this process), else torch.cuda's."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split()
            if out:
                return min(float(x) for x in out) / 1024  # MiB
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / GIB


def _with(cfg: RunConfig, changes: dict) -> RunConfig:  # cfg with dotted paths set
    data = cfg.model_dump()
    for path, value in changes.items():
        *head, last = path.split(".")
        node = data
        for part in head:
            node = node[part]
        node[last] = value
    return RunConfig.model_validate(data)


def fixes(cfg: RunConfig) -> list[dict]:
    """Knob settings that lower the peak, simplest first: checkpointing, ZeRO-3, a smaller
    micro-batch (the global batch kept by accumulation where it divides), then together."""
    d, mb = cfg.distributed, cfg.data.micro_batch_size
    ckpt = {} if cfg.model.gradient_checkpointing else {"model.gradient_checkpointing": True}
    zero3 = {}
    if d.engine == "deepspeed" and d.zero_stage < 3:
        zero3 = {"distributed.zero_stage": 3}
    elif d.engine == "ddp" and d.workers > 1:
        zero3 = {"distributed.engine": "deepspeed", "distributed.zero_stage": 3}
    smaller = []
    for m in range(mb - 1, 0, -1):
        change = {"data.micro_batch_size": m}
        if (mb * cfg.data.gradient_accumulation_steps) % m == 0:
            change["data.gradient_accumulation_steps"] = mb * cfg.data.gradient_accumulation_steps // m
        smaller.append(change)
    offload = ({"distributed.offload_optimizer": True} if d.engine == "deepspeed" and not d.offload_optimizer
               else {})
    out = [c for c in (ckpt, zero3) if c] + smaller
    out += [c for c in ({**ckpt, **zero3},) if ckpt and zero3] + [{**ckpt, **s} for s in smaller if ckpt]
    out += [{**ckpt, **zero3, **s} for s in smaller if ckpt and zero3]
    out += [{**ckpt, **zero3, **offload}] if offload else []
    return out


def _describe(change: dict) -> str:
    accumulation = change.get("data.gradient_accumulation_steps")
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in change.items() if k != "data.gradient_accumulation_steps") + (
        f" (with data.gradient_accumulation_steps: {accumulation}, the same global batch)" if accumulation else "")


def check_fit(cfg: RunConfig, capacity_gib: float, where: str = "") -> Estimate:
    """The estimate, or ConfigError (one line) when it exceeds ``capacity_gib`` per worker,
    naming the first knob setting (:func:`fixes`) whose estimate fits."""
    est = estimate(cfg)
    if est.total <= capacity_gib * GIB:
        return est
    fit = None
    for change in fixes(cfg):
        try:
            other = estimate(_with(cfg, change))
        except (ValueError, ConfigError):  # a combination the schema refuses
            continue
        if other.total <= capacity_gib * GIB:
            fit = f"set {_describe(change)} (estimate {other.total / GIB:.1f} GiB)"
            break
    if fit is None:
        fit = ("nothing fits even with checkpointing, ZeRO-3 and micro-batch 1: use more workers "
               "(resources.workers), GPUs with more memory, a shorter data.max_length or a smaller model")
    head = f"{where}: " if where else ""
    raise ConfigError(f"{head}{est.summary(capacity_gib)} does not fit: {fit}")
