"""Base model loading and the method wrapper (PLoRA / LoRA adapters via peft, or full FT).

``tiny`` is a random-init Llama with a byte-level tokenizer built in code: it needs no
download, so tests and the quick example run anywhere in milliseconds per step. Any
other name is a local directory or hub id that transformers loads; names of embedded
assets (``plora_ray.assets``) resolve to their cached directory.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from .config import ConfigError, ModelConfig, RunConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(cfg: ModelConfig, vocab_size: int, seed: int = 0, eos_token_id: int = 256,
               pad_token_id: int = 257) -> LlamaForCausalLM:
    """Random-init Llama; the special ids default to ``tiny_tokenizer``'s."""
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
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def resolve_model_path(name: str) -> str:
    """Embedded asset names map to their cached directory; anything else is passed on."""
    try:
        from . import assets
    except ImportError:  # assets module not available
        return name
    if name in getattr(assets, "KNOWN_MODELS", {}):
        return str(assets.model_path(name))
    return name


def load_base(cfg: ModelConfig, seed: int = 0):
    """(model, tokenizer) for ``cfg``; the tokenizer always has a pad token."""
    if cfg.name_or_path == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_model(cfg, len(tokenizer), seed, tokenizer.eos_token_id, tokenizer.pad_token_id), tokenizer
    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"field 'model.name_or_path': cannot load '{cfg.name_or_path}' ({first}): give a "
            "local model directory, a reachable hub id, or 'tiny'"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    return model, tokenizer


def apply_method(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """Wrap for ``plora``/``lora`` (peft LoRA, adapters kept in fp32) or unfreeze for ``full``."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
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


def build_model(cfg: RunConfig):
    """(model ready to train, tokenizer)."""
    model, tokenizer = load_base(cfg.model, cfg.seed)
    return apply_method(model, cfg), tokenizer
