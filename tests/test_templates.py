"""Chat templates by name, as a Jinja string or a file: each renders the dialogue as its model
family does, and the assistant-only loss mask covers exactly the replies (checked against spans
written here by hand, on the byte-level tiny tokenizer: one token per character)."""

import math

import pytest

from plora_ray.assets.dialogues import tokenize_dialogue
from plora_ray.assets.templates import TEMPLATES, apply_template
from plora_ray.config.io import build_run_config
from plora_ray.config.names import CHAT_TEMPLATES, IGNORE
from plora_ray.config.schema import ConfigError
from plora_ray.run.loop import fit, setup
from plora_ray.run.models import tiny_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
E = "<|im_end|>"  # the tiny tokenizer's end-of-sequence token (</s> on LLaMA)
# (template, the whole text, the labelled pieces in order: what the loss is on)
EXPECTED = [
    ("chatml", f"<|im_start|>system\nBe brief.{E}\n<|im_start|>user\nHi there{E}\n<|im_start|>assistant\n"
               f"Hello!{E}\n<|im_start|>user\n2+2?{E}\n<|im_start|>assistant\n4{E}\n",
     [f"Hello!{E}\n", f"4{E}\n"]),
    ("llama-2", f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! {E}[INST] 2+2? [/INST] 4 {E}",
     [f" Hello! {E}", f" 4 {E}"]),
    ("vicuna_v1.1", f"Be brief. USER: Hi there ASSISTANT: Hello!{E}USER: 2+2? ASSISTANT: 4{E}",
     [f" Hello!{E}", f" 4{E}"]),
    ("plain", f"Be brief.\nHi there\nHello!{E}2+2?\n4{E}", [f"Hello!{E}", f"4{E}"]),
]


def hand_mask(tokenizer, text: str, pieces: list[str]) -> list[int]:
    """Labels from character spans found by hand: each piece after the one before."""
    spans, at = [], 0
    for piece in pieces:
        start = text.index(piece, at)
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i if any(a <= s and e <= b for a, b in spans) else IGNORE
            for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]


def test_every_named_template_is_known_to_the_config():
    assert tuple(TEMPLATES) == CHAT_TEMPLATES


@pytest.mark.parametrize("name,text,pieces", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_template_renders_and_masks_exactly_the_replies(name, text, pieces):
    tok = tiny_tokenizer()
    apply_template(tok, name)
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == text
    got = tokenize_dialogue(tok, MESSAGES, 4096)
    assert got["labels"] == hand_mask(tok, text, pieces)
    assert tok.decode([i for i in got["labels"] if i != IGNORE]) == "".join(pieces)


def test_vicuna_without_a_system_turn_uses_fastchats_system_prompt():
    tok = tiny_tokenizer()
    apply_template(tok, "vicuna_v1.1")
    text = tok.apply_chat_template(MESSAGES[1:3], tokenize=False)
    assert text == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                    f"gives helpful, detailed, and polite answers to the user's questions. USER: Hi there "
                    f"ASSISTANT: Hello!{E}")


def test_a_jinja_string_and_a_jinja_file(tmp_path):
    jinja = "{% for m in messages %}{{ m['role'] + '> ' + m['content'] + '\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant> ' }}{% endif %}"
    (tmp_path / "t.jinja").write_text(jinja)
    for value in (jinja, str(tmp_path / "t.jinja")):
        tok = tiny_tokenizer()
        apply_template(tok, value)
        got = tokenize_dialogue(tok, MESSAGES[1:3], 4096)
        assert tok.decode([i for i in got["labels"] if i != IGNORE]) == "Hello!\n"


def test_an_unknown_template_is_one_line_naming_the_field():
    with pytest.raises(ConfigError) as err:
        build_run_config({"method": "lora", "model": {"chat_template": "vicuna"}}, "run")
    assert "field 'model.chat_template': 'vicuna' is not a template name" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_base_model_run_with_the_plain_template_trains():
    cfg = build_run_config({"method": "lora", "model": {"chat_template": "plain"}, "optim": {"lr": 1e-2},
                            "data": {"max_steps": 3, "max_length": 64, "tokenize_cache": False}}, "run")
    run = fit(setup(cfg), progress=False)
    losses = [h["loss"] for h in run.history]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert "<|im_start|>" not in run.tokenizer.decode(run.examples[0]["input_ids"])  # no ChatML markers
    assert run.tokenizer.chat_template == TEMPLATES["plain"]
