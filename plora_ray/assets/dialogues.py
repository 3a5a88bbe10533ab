"""Conversation files read and normalised: rows in, ``[{role, content}, ...]`` out, one-line errors.

Row formats accepted (json array, jsonl or parquet):

* OpenAI / Tulu: ``{"messages": [{"role": "user", "content": ...}, ...]}``
* ShareGPT / FastChat: ``{"conversations": [{"from": "human", "value": ...}, ...]}``
* alpaca: ``{"instruction": ..., "input": ..., "output": ...}``

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
    else:
        raise DataError(f"{where}: unknown row format (keys {sorted(row)}): expected 'messages', "
                        "'conversations' or 'instruction'/'output'")
    for i, m in enumerate(out):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}: use system, user or assistant")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message to learn from")
    return out


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


def file_rows(name: str) -> list[tuple[str, object]]:
    """(location, row) pairs of a data.train_files entry; DataError if it holds no row."""
    rows = named_rows(name)
    if rows is None:
        rows = [(f"{name}:{n}", row) for n, row in read_rows(name)]
    if not rows:
        raise DataError(f"{name}: the file holds no rows: give a file of conversations or remove it "
                        "from data.train_files")
    return rows


def check_files(files: list[str]) -> None:
    """Read and normalise every row, as training will, without a tokenizer: a broken, binary,
    empty or assistant-less file fails here in the driver (DataError, one line) instead of in
    every worker. The embedded mixes are skipped: they are built from verified benchmark data."""
    from plora_ray.config.names import EMBEDDED_MIXES

    for name in dict.fromkeys(files):
        if name not in EMBEDDED_MIXES:
            for where, row in file_rows(name):
                to_messages(row, where)
