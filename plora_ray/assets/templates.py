"""Chat templates by name: how a dialogue becomes the text a model trains on and is scored on.

``model.chat_template``: null keeps the tokenizer's own (ChatML where it has none); a name below;
a Jinja string (Hugging Face's ``chat_template`` format); or the path of a ``.jinja`` file.

* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn (Qwen, SmolLM2, OpenHermes).
* ``llama-2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply </s>`` (Llama-2-chat).
* ``vicuna_v1.1``: FastChat's, the paper's: ``SYSTEM USER: user ASSISTANT: reply</s>USER: ...``
  (``SeparatorStyle.ADD_COLON_TWO``, sep " ", sep2 the end-of-sequence token).
* ``plain``: base models: each turn's text, a newline after a prompt turn and the
  end-of-sequence token after a reply; no role markers.

Every template renders prefix-consistently (the text up to a reply, with the generation
prompt, is a prefix of the text through it), which the assistant-only loss mask needs
(:func:`plora_ray.assets.dialogues.tokenize_dialogue`). Special tokens come from the
tokenizer (``bos_token``, ``eos_token``), so a template fits any vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from plora_ray.config.schema import ConfigError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
VICUNA_V1_1 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% set turns = messages %}{% endif %}"
    "{{ system + ' ' }}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
)
TEMPLATES = {"chatml": CHATML, "llama-2": LLAMA_2, "vicuna_v1.1": VICUNA_V1_1, "plain": PLAIN}


def template_text(value: str) -> str:
    """The Jinja text of a ``model.chat_template`` value (a name, a Jinja string or a file)."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"field 'model.chat_template': '{value}' is not a template name "
                          f"({', '.join(TEMPLATES)}), a Jinja string or an existing .jinja file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"field 'model.chat_template': cannot read '{value}' ({exc}): give a "
                          "UTF-8 Jinja file") from None


def apply_template(tokenizer, value: str | None) -> None:
    """Set ``tokenizer.chat_template`` from ``model.chat_template`` (null: its own, else ChatML)."""
    if value is not None:
        tokenizer.chat_template = template_text(value)
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML
