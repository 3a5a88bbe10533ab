"""Base model loading and the method wrapper (PLoRA / LoRA adapters via peft, or full FT).

``tiny`` is a random-init Llama with a byte-level tokenizer built in code: it needs no
download, so tests and the quick example run anywhere in milliseconds per step. Any
other name is a local directory or hub id that transformers loads; names of embedded
assets (``plora_ray.assets.fetch``) resolve to their cached directory.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from plora_ray.assets.templates import CHATML, apply_template
from plora_ray.config.names import IGNORE
from plora_ray.config.schema import ConfigError, ModelConfig, RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The architecture of each embedded model (assets.KNOWN_MODELS), so its module tree can be
# checked before the weights are fetched and converted (HuggingFaceTB/SmolLM2-135M-Instruct).
EMBEDDED_CONFIGS = {
    "smollm2-135m-instruct": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2),
}
# layer types peft's LoRA can wrap (transformers' Conv1D is GPT-2's linear layer)
LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def tiny_model(cfg: ModelConfig, vocab_size: int, seed: int = 0, eos_token_id: int = 256,
               pad_token_id: int = 257, zero3: dict | None = None) -> LlamaForCausalLM:
    """Random-init Llama; the special ids default to ``tiny_tokenizer``'s. ``zero3`` (a DeepSpeed
    config): built inside ``deepspeed.zero.Init``, each module's weights partitioned as it is
    made, then initialised gathered module by module (:func:`partitioned_tiny`)."""
    t = cfg.tiny
    if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(
            "field 'model.tiny': hidden_size must divide by num_attention_heads, and "
            "num_attention_heads by num_key_value_heads"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if zero3 is not None:
            return partitioned_tiny(config, zero3)
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def partitioned_tiny(config: LlamaConfig, zero3: dict) -> LlamaForCausalLM:
    """The tiny Llama built ZeRO-3 partitioned, with the weights the one-process build draws (on
    the CPU; a GPU's generator draws others): each module's constructor draws on its full
    tensors before ``zero.Init`` partitions them (rank 0's values are broadcast), and each
    ``post_init`` weight pass (the inner model's, then the head's) runs where the one-process
    build runs it, module by module on gathered weights (transformers' ``initialize_weights_zero3``)
    instead of on the empty partitions."""
    import deepspeed
    from unittest import mock
    from transformers import PreTrainedModel
    from transformers.integrations.deepspeed import initialize_weights_zero3, prevent_arange_dtype_change

    def init_weights_gathered(self):  # PreTrainedModel.init_weights, on gathered weights
        initialize_weights_zero3(self)
        self.tie_weights(recompute_mapping=False)

    with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=zero3), \
            mock.patch.object(PreTrainedModel, "init_weights", init_weights_gathered):
        return LlamaForCausalLM(config)


def resolve_model_path(name: str) -> str:
    """Embedded asset names map to their cached directory; anything else is passed on."""
    try:
        from plora_ray.assets import fetch as assets
    except ImportError:  # assets module not available
        return name
    if name in getattr(assets, "KNOWN_MODELS", {}):
        return str(assets.model_path(name))
    return name


@contextlib.contextmanager
def hf_zero3(zero3: dict | None):
    """Inside: transformers' ``from_pretrained`` builds in ``deepspeed.zero.Init`` and loads each
    module's weights into its partitions (``HfDeepSpeedConfig`` alive); after: off again, so
    nothing else (generation, resizing) changes behaviour."""
    if zero3 is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(zero3)  # transformers keeps only a weak reference
    try:
        yield alive
    finally:
        unset_hf_deepspeed_config()


def load_base(cfg: ModelConfig, seed: int = 0, zero3: dict | None = None):
    """(model, tokenizer) for ``cfg``; the tokenizer always has a pad token. ``zero3`` (a
    DeepSpeed ZeRO-3 config): the model is built partitioned, no rank holding all of it."""
    if cfg.name_or_path == "tiny":
        tokenizer = tiny_tokenizer()
        apply_template(tokenizer, cfg.chat_template)
        model = tiny_model(cfg, len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id, zero3)
        return model, tokenizer
    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with hf_zero3(zero3):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as exc:
        attention_error(cfg, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"field 'model.name_or_path': cannot load '{cfg.name_or_path}' ({first}): give a "
            "local model directory, a reachable hub id, or 'tiny'"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_template(tokenizer, cfg.chat_template)
    return model, tokenizer


def attention_error(cfg: ModelConfig, exc: Exception) -> None:
    """ConfigError (one line) when transformers refused ``exc`` for the attention backend."""
    text = " ".join(str(exc).split())
    if cfg.attn_implementation in text or "attention implementation" in text:
        raise ConfigError(f"field 'model.attn_implementation': '{cfg.name_or_path}' cannot use "
                          f"{cfg.attn_implementation} ({text[:200]}): use eager") from None


def base_config(cfg: ModelConfig):
    """The transformers config of a non-tiny base, without loading weights; ConfigError (one
    line) if there is none. A hub id is looked up in the local cache only when HF_HUB_OFFLINE
    is set, so a missing model fails at once instead of after the hub's retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging

    name = cfg.name_or_path
    if name in EMBEDDED_CONFIGS:
        return LlamaConfig(**EMBEDDED_CONFIGS[name])
    local = Path(name).expanduser()
    offline = bool(constants.HF_HUB_OFFLINE)
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # the hub's retry warnings would bury the one-line error
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else name,
                                          trust_remote_code=cfg.trust_remote_code,
                                          local_files_only=offline and not local.is_dir())
    except (OSError, ValueError, KeyError) as exc:
        first = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
        known = ", ".join(["tiny", *EMBEDDED_CONFIGS])
        if local.is_dir():
            fix = f"'{name}' is not a model directory ({first}): give a directory written by save_pretrained"
        elif offline:
            fix = (f"'{name}' is not a local directory and not in the hub cache (HF_HUB_OFFLINE is "
                   f"set): fix the name, use one of {known}, or download it first")
        else:
            fix = f"cannot load the config of '{name}' ({first}): give a local directory, a hub id, or one of {known}"
        raise ConfigError(f"field 'model.name_or_path': {fix}") from None
    finally:
        hub_logging.set_verbosity(verbosity)


PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
         {"role": "assistant", "content": "6."}]


def check_tokenizer(cfg: ModelConfig) -> None:
    """The tokenizer loads (files only, no weights) and the chat template renders a two-turn
    dialogue prefix-consistently with both replies labelled: ConfigError (one line) if not. An
    embedded model's own tokenizer is known good; a template given with it is rendered with the
    tiny tokenizer's special tokens (no fetch)."""
    from huggingface_hub import constants

    from plora_ray.assets.dialogues import DataError, tokenize_dialogue

    name = cfg.name_or_path
    if name == "tiny" or name in EMBEDDED_CONFIGS:
        if name != "tiny" and cfg.chat_template is None:
            return
        tokenizer = tiny_tokenizer()
    else:
        local = Path(name).expanduser()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(local) if local.is_dir() else name, trust_remote_code=cfg.trust_remote_code,
                local_files_only=bool(constants.HF_HUB_OFFLINE) and not local.is_dir())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = " ".join(str(exc).strip().split("\n")[0].split())[:200] or type(exc).__name__
            raise ConfigError(f"field 'model.name_or_path': '{name}' has no tokenizer that loads ({first}): "
                              "save the tokenizer beside the model (tokenizer.save_pretrained)") from None
    apply_template(tokenizer, cfg.chat_template)
    where = "field 'model.chat_template'" if cfg.chat_template is not None else \
        f"field 'model.chat_template' (null: the tokenizer of '{name}''s own)"
    try:
        ex = tokenize_dialogue(tokenizer, PROBE, 4096)
    except DataError as exc:
        raise ConfigError(f"{where}: {exc}: give another template (e.g. chatml)") from None
    except Exception as exc:  # jinja2's errors, a template raising on purpose
        first = " ".join(str(exc).strip().split("\n")[0].split())[:200] or type(exc).__name__
        raise ConfigError(f"{where}: the template does not render a dialogue ({type(exc).__name__}: "
                          f"{first}): fix it, or name one of chatml, llama-2, vicuna_v1.1, plain") from None
    text = tokenizer.decode([t for t in ex["labels"] if t != IGNORE])
    if "4." not in text or "6." not in text:
        raise ConfigError(f"{where}: the template does not write the assistant's replies (they would "
                          "never be trained on): fix it, or name one of chatml, llama-2, vicuna_v1.1, plain")


def model_skeleton(cfg: ModelConfig) -> torch.nn.Module:
    """The base model's module tree on the meta device: no weight is read or allocated, so
    checking module names costs milliseconds even for a large model."""
    if cfg.attn_implementation == "flash_attention_2":  # module names only: checked by check_attention
        cfg = cfg.model_copy(update={"attn_implementation": "sdpa"})
    if cfg.name_or_path == "tiny":
        with torch.device("meta"):
            tok = tiny_tokenizer()
            return tiny_model(cfg, len(tok), 0, tok.eos_token_id, tok.pad_token_id)
    config = base_config(cfg)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                    attn_implementation=cfg.attn_implementation)
    except (ValueError, KeyError) as exc:  # a config of an architecture with no causal-LM head
        attention_error(cfg, exc)
        first = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
        raise ConfigError(f"field 'model.name_or_path': '{cfg.name_or_path}' is not a causal language "
                          f"model ({first}): give a decoder model") from None


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every name in ``lora.target_modules`` must match (as peft matches: the module's name or
    its last dotted parts) at least one layer LoRA can wrap; peft itself only fails when no
    name matches, so a typo beside a valid name would silently train fewer layers."""
    modules = list(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, LORA_LAYERS) and n})
    for target in targets:
        hits = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not hits:
            hint = difflib.get_close_matches(target, linear, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else "fix or remove it"
            raise ConfigError(f"field 'lora.target_modules': '{target}' matches no module of the model "
                              f"({fix}); its adaptable layers are: {', '.join(linear)}")
        if not any(isinstance(m, LORA_LAYERS) for m in hits):
            raise ConfigError(f"field 'lora.target_modules': '{target}' names {type(hits[0]).__name__} "
                              f"modules, which LoRA cannot adapt: name layers such as {', '.join(linear)}")


def apply_method(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """Wrap for ``plora``/``lora`` (peft LoRA, adapters kept in fp32) or unfreeze for ``full``."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    check_target_modules(model, cfg.lora.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        init_lora_weights=True if cfg.lora.init_a == "kaiming" else "gaussian",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            # peft 0.21 calls a transformers API deprecated in 5.x; not actionable here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)
    except ValueError as exc:
        if "not found" in str(exc) or "Target modules" in str(exc):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear)})
            raise ConfigError(
                f"field 'lora.target_modules': {cfg.lora.target_modules} not found in the model; "
                f"its linear layers are: {', '.join(names)}"
            ) from None
        raise


def check_attention(cfg: RunConfig) -> None:
    """``model.attn_implementation: flash_attention_2`` where it cannot run (no flash-attn
    package, no GPU workers, a float32 backbone): ConfigError (one line) before any work."""
    import importlib.util

    if cfg.model.attn_implementation != "flash_attention_2":
        return
    field = "field 'model.attn_implementation': flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"{field} needs the flash-attn package, which is not installed here (pip install "
                          "flash-attn on a CUDA machine): install it, or use sdpa")
    if not cfg.distributed.use_gpu:
        raise ConfigError(f"{field} runs on GPUs only, but distributed.use_gpu is false: set "
                          "distributed.use_gpu: true, or use sdpa")
    if cfg.model.dtype != "bfloat16":
        raise ConfigError(f"{field} computes in 16-bit only, but model.dtype is {cfg.model.dtype}: set "
                          "model.dtype: bfloat16, or use sdpa")


def enable_checkpointing(model) -> None:
    """Transformers' gradient (activation) checkpointing, non-reentrant: each decoder layer's
    activations are recomputed in the backward pass. Non-reentrant checkpointing needs no input
    that requires grad (frozen embeddings under LoRA are fine); transformers also hooks the
    embeddings' output to require it, as peft expects."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hidden_width(cfg: ModelConfig) -> int | None:
    """The base model's hidden size, from its config (no weights read)."""
    if cfg.name_or_path == "tiny":
        return cfg.tiny.hidden_size
    config = base_config(cfg)
    return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)


def build_model(cfg: RunConfig, world: int = 1):
    """(model ready to train, tokenizer). Under DeepSpeed ZeRO-3 (``world`` workers, the process
    group up) the base is built partitioned (``deepspeed.zero.Init``): no rank ever holds it all."""
    d, zero3 = cfg.distributed, None
    if d.engine == "deepspeed" and d.zero_stage == 3:
        from plora_ray.run.dsconfig import deepspeed_config, prepare_deepspeed

        zero3 = deepspeed_config(cfg, world, hidden_width(cfg.model))
        prepare_deepspeed(init_distributed=True)  # zero.Init reads the world size from DeepSpeed's comm
    model, tokenizer = load_base(cfg.model, cfg.seed, zero3)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    return apply_method(model, cfg), tokenizer
