"""Conversation files read and normalised: rows in, ``[{role, content}, ...]`` out, one-line errors.

Row formats accepted (json array, jsonl or parquet):

* OpenAI / Tulu: ``{"messages": [{"role": "user", "content": ...}, ...]}``
* ShareGPT / FastChat: ``{"conversations": [{"from": "human", "value": ...}, ...]}``
* alpaca: ``{"instruction": ..., "input": ..., "output": ...}``
* prompt/completion: ``{"prompt": ..., "completion": ...}``
* multiple choice: ``{"question": ..., "choices": [...], "answer": 2}`` (MMLU's shape; ARC's
  ``{text, label}`` choices and letter answers too), written as the embedded mix writes it

A ``system`` field, where a row has one, becomes the system message. Other column names are
mapped onto these by :mod:`plora_ray.assets.sources` (``data.sources[].columns``).

Loss is on assistant tokens only (the reply and its end-of-turn token). The mask comes from
character spans: the template rendered up to a reply (with the generation prompt) is a
prefix of the template rendered through it, and the tokens inside that span are labelled
(:func:`tokenize_dialogue`). Training (:mod:`plora_ray.run.data`) and the held-out loss
(:mod:`plora_ray.evaluation.heldout`) read their dialogues through this one module.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from plora_ray.config.names import IGNORE

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant"}
ROLES = {"system", "user", "assistant"}


class DataError(Exception):
    """A user-facing data problem; ``str(err)`` is one line naming file, line and fix."""


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("plora_ray") / "resources" / f"{name.replace('-', '_')}.jsonl"))


def read_rows(path: str | Path) -> list[tuple[int, object]]:
    """(line number, row) pairs from json / jsonl / parquet; line numbers are 1-based."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory: list its json, jsonl or parquet files in data.train_files")
    if not p.is_file():
        raise DataError(f"{p}: file not found: check data.train_files")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{p}: not a readable parquet file ({' '.join(str(exc).split())})") from None
        return list(enumerate(table.to_pylist(), start=1))
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
                        "give a json, jsonl or parquet file") from None
    if "\x00" in text:
        raise DataError(f"{p}: binary content (NUL bytes) in a json/jsonl file: give a json, jsonl "
                        "or parquet file")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return list(enumerate(rows, start=1))
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{lineno}: invalid JSON ({exc.msg}): fix or remove that line") from None
    return out


def to_messages(row: object, where: str) -> list[dict]:
    """Normalise one row of any accepted format to a list of {role, content}."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
    elif "conversations" in row:
        convs = row["conversations"]
        if not isinstance(convs, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}}")
        out = []
        for i, m in enumerate(convs):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{i}] has unknown speaker {m['from']!r} "
                                f"(use one of {sorted(SHAREGPT_ROLES)})")
            out.append({"role": role, "content": m["value"]})
    elif "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    elif "prompt" in row and "completion" in row:
        out = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif "question" in row and "choices" in row and "answer" in row:
        out = _multiple_choice(row, where)
    else:
        raise DataError(f"{where}: unknown row format (keys {sorted(row)}): expected 'messages', "
                        "'conversations', 'instruction'/'output', 'prompt'/'completion' or "
                        "'question'/'choices'/'answer' (map other columns onto these with "
                        "data.sources[].columns)")
    if row.get("system") and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": row["system"]})
    for i, m in enumerate(out):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}: use system, user or assistant")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message to learn from")
    return out


def _multiple_choice(row: dict, where: str) -> list[dict]:
    """A multiple-choice row as the embedded mix writes it (:mod:`plora_ray.assets.mix`):
    ``choices`` a list of texts or ARC's ``{text, label}``; ``answer`` the gold index, or a
    label / letter (ARC's ``answerKey``)."""
    from plora_ray.assets.mix import format_multiple_choice, multiple_choice_answer

    choices, labels = row["choices"], None
    if isinstance(choices, dict) and "text" in choices:
        choices, labels = choices["text"], choices.get("label")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings (or ARC's {{text, label}})")
    answer = row["answer"]
    keys = [str(x).strip() for x in labels] if labels else [chr(ord("A") + k) for k in range(len(choices))]
    a = str(answer).strip()
    gold = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        gold = answer
    elif a in keys:
        gold = keys.index(a)
    elif a.isdigit():
        gold = int(a)
    if gold is None or not 0 <= gold < len(choices):
        raise DataError(f"{where}: answer {answer!r} names none of the {len(choices)} choices: give the "
                        "gold index (0-based) or its label")
    return [{"role": "user", "content": format_multiple_choice(str(row["question"]), choices, row.get("subject"))},
            {"role": "assistant", "content": multiple_choice_answer(choices, gold)}]


def tokenize_dialogue(tokenizer, messages: list[dict], max_length: int) -> dict:
    """input_ids and labels (IGNORE outside assistant replies), truncated to max_length."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(end_text) or not end_text.startswith(start_text):
            raise DataError("the tokenizer's chat template does not render conversations "
                            "prefix-consistently; assistant masking needs that")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [IGNORE] * len(ids)
    for j, (s, e) in enumerate(enc["offset_mapping"][:max_length]):
        if any(a <= s and e <= b and e > s for a, b in spans):
            labels[j] = ids[j]
    return {"input_ids": ids, "labels": labels}


def named_rows(name: str) -> list[tuple[str, object]] | None:
    """Rows of a bundled or embedded dataset name, with a location for messages; else None."""
    from plora_ray.config.names import EMBEDDED_MIXES

    if name in EMBEDDED_MIXES:
        from plora_ray.assets.mix import build_embedded_mix

        return [(f"{name}[{i}]", row) for i, row in enumerate(build_embedded_mix(name))]
    path = bundled_path(name)
    if not Path(name).exists() and path.exists():
        return [(f"{path}:{n}", row) for n, row in read_rows(path)]
    return None
