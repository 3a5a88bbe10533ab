"""The embedded training mix: chat dialogues built from the offline benchmark data.

Why: no instruction-tuning corpus is reachable offline, so the framework trains on data that is
disjoint from what it evaluates on:

* GSM8K: 1,000 of the 1,319 test problems (a fixed, seeded split); the other 319 are held out
  and returned by ``gsm8k_heldout()`` for evaluation. Never evaluate GSM8K on all 1,319 after
  training on this mix.
* ARC validation: easy 570 + challenge 299 = 869 (ARC *test* stays for evaluation).
* MMLU dev + validation: 285 + 1,531 = 1,816 (MMLU *test* stays for evaluation).

Rows are ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "source": str}``
with ``source`` one of ``gsm8k``, ``arc_easy``, ``arc_challenge``, ``mmlu`` (for per-source
statistics; drop it if a consumer wants only ``messages``).

Dialogue formats (see ``format_multiple_choice`` / ``multiple_choice_answer``):

* GSM8K: user = the question; assistant = the reference solution with the ``<<48/2=24>>``
  calculator annotations removed (they are not natural text), ending in the ``#### N`` line.
* ARC / MMLU: user = the question, a blank line, one ``X. choice`` line per option (always
  lettered A, B, C, ... even where ARC used 1-4), a blank line and ``Answer with the letter of
  the correct option.``; MMLU questions are preceded by ``The following is a multiple choice
  question about <subject with spaces>.``; assistant = ``The answer is B. <choice text>``.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any, Iterable

from plora_ray.assets.benchmarks import load_arc, load_gsm8k, load_mmlu

__all__ = [
    "MIX_NAMES",
    "SEED",
    "build_embedded_mix",
    "format_multiple_choice",
    "gsm8k_heldout",
    "gsm8k_split",
    "multiple_choice_answer",
    "write_jsonl",
]

SEED = 20240226  # PLoRA's arXiv date; changing it changes every split below
GSM8K_TRAIN_SIZE = 1000
SMALL_PER_SOURCE = 100  # embedded-mix-small: 100 GSM8K + 100 ARC + 100 MMLU = 300 rows
from plora_ray.config.names import EMBEDDED_MIXES as MIX_NAMES

_LETTERS = string.ascii_uppercase
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_split(seed: int = SEED) -> tuple[list[int], list[int]]:
    """Indices into ``load_gsm8k("test")``: (1,000 train, 319 held out), each sorted."""
    n = len(load_gsm8k("test"))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:GSM8K_TRAIN_SIZE]), sorted(order[GSM8K_TRAIN_SIZE:])


def gsm8k_heldout() -> list[dict[str, Any]]:
    """The 319 GSM8K test problems not in the training mix, ``{question, answer}``, test order."""
    rows = load_gsm8k("test")
    return [rows[i] for i in gsm8k_split()[1]]


def format_multiple_choice(question: str, choices: list[str], subject: str | None = None) -> str:
    """User turn for a multiple-choice question (options lettered A, B, C, ...)."""
    head = ""
    if subject:
        head = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n"
    options = "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{head}{question.strip()}\n\n{options}\n\nAnswer with the letter of the correct option."


def multiple_choice_answer(choices: list[str], gold: int) -> str:
    """Assistant turn for a multiple-choice question: ``The answer is B. <choice text>``."""
    return f"The answer is {_LETTERS[gold]}. {choices[gold]}"


def _dialogue(user: str, assistant: str, source: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "source": source,
    }


def _gsm8k_answer(answer: str) -> str:
    return _CALC.sub("", answer).strip()


def _mc_dialogue(row: dict[str, Any], gold: int, source: str, subject: str | None = None) -> dict:
    user = format_multiple_choice(row["question"], row["choices"], subject)
    return _dialogue(user, multiple_choice_answer(row["choices"], gold), source)


def _rows_by_source() -> dict[str, list[dict[str, Any]]]:
    gsm = load_gsm8k("test")
    out = {
        "gsm8k": [
            _dialogue(gsm[i]["question"], _gsm8k_answer(gsm[i]["answer"]), "gsm8k")
            for i in gsm8k_split()[0]
        ]
    }
    for subset in ("easy", "challenge"):
        source = f"arc_{subset}"
        out[source] = [_mc_dialogue(r, r["gold"], source) for r in load_arc(subset, "validation")]
    out["mmlu"] = [
        _mc_dialogue(r, r["answer"], "mmlu", r["subject"])
        for split in ("dev", "validation")
        for r in load_mmlu(split)
    ]
    return out


def build_embedded_mix(name: str = "embedded-mix") -> list[dict[str, Any]]:
    """The training mix, shuffled with ``SEED``.

    ``embedded-mix``: 3,685 rows (1,000 GSM8K + 869 ARC + 1,816 MMLU).
    ``embedded-mix-small``: 300 rows, the first 100 GSM8K, 100 ARC and 100 MMLU rows of the
    full mix's order (so it is a subset of it), in that same shuffled order.
    """
    if name not in MIX_NAMES:
        raise ValueError(f"unknown mix {name!r}; use one of {list(MIX_NAMES)}")
    rows = [r for group in _rows_by_source().values() for r in group]
    random.Random(SEED).shuffle(rows)
    if name == "embedded-mix":
        return rows
    taken: dict[str, int] = {"gsm8k": 0, "arc": 0, "mmlu": 0}
    small = []
    for r in rows:
        family = "arc" if r["source"].startswith("arc") else r["source"]
        if taken[family] < SMALL_PER_SOURCE:
            taken[family] += 1
            small.append(r)
    return small


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as UTF-8 JSON lines (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
