"""A user's own copy of a built-in benchmark (``eval.datasets``, ``evaluate --dataset``), read
through ``datasets`` as training sources are (:func:`plora_ray.assets.sources.open_source`):
a local json/jsonl/parquet/csv/arrow file (compressed too: ``.jsonl.gz``), taken as the split;
a ``save_to_disk`` folder (a DatasetDict's ``split``); a dataset folder or a hub id
(``load_dataset(path, name, split=...)``). The rows need the hub dataset's columns
(``config.evaluation.COPY_COLUMNS``) and become ``benchmarks``' schema (``task_rows``).

:func:`load_copy` returns them with a digest of their content, which names the item set (the
evaluation's ids ``<task>-custom-<digest>-<i>``). Errors: one line starting
``eval.datasets.<task>:``, naming the path and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from plora_ray.assets.benchmarks import task_rows
from plora_ray.assets.dialogues import DataError
from plora_ray.assets.fetch import AssetError
from plora_ray.assets.sources import BUILDERS, open_source, quiet
from plora_ray.config.data import SourceConfig
from plora_ray.config.evaluation import COPY_COLUMNS
from plora_ray.config.paths import cache_root

SCHEMAS = {"gsm8k": "openai/gsm8k's", "mmlu": "cais/mmlu's", "arc_easy": "allenai/ai2_arc's",
           "arc_challenge": "allenai/ai2_arc's"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # datasets' json/csv builders open these by suffix


class CopyError(AssetError, ValueError):
    """A user's benchmark copy is missing, unreadable, or lacks a column (one line)."""


def _one_line(text: str, limit: int = 240) -> str:
    return " ".join(str(text).split())[:limit]


def _compressed_builder(p: Path) -> str | None:
    """The datasets builder of a compressed local file (``x.jsonl.gz`` -> json), else None."""
    if p.suffix.lower() in COMPRESSIONS and p.is_file():
        return BUILDERS.get(Path(p.stem).suffix.lower())
    return None


def open_copy(path: str | Path, *, name: str | None = None, split: str = "test", cache: Path | None = None):
    """The ``datasets.Dataset`` of a copy (see the module docstring); CopyError when it cannot
    be opened. ``cache``: datasets' cache (default ``<cache root>/datasets``, the training
    sources' own)."""
    import datasets
    from datasets.exceptions import DatasetsError

    cache = Path(cache) if cache is not None else cache_root() / "datasets"
    text, p = str(path), Path(path).expanduser()
    try:
        with quiet():
            builder = _compressed_builder(p)
            if builder is not None:
                return datasets.load_dataset(builder, data_files=str(p.resolve()), split="train",
                                             cache_dir=str(cache / "raw"))
            ds, _ = open_source(SourceConfig(path=text, name=name, split=split), None, cache)
            return ds
    except DataError as exc:  # sources names data.train_files: the caller names its own field
        message = str(exc)
        raise CopyError(message.split(": ", 1)[1] if message.startswith("data.") else message) from None
    except (DatasetsError, OSError, ValueError) as exc:
        raise CopyError(f"'{text}': datasets cannot read it ({_one_line(exc)}): give a json/jsonl/parquet "
                        "file, a save_to_disk or dataset folder, or a hub dataset id") from None


def read_copy(path: str | Path, *, name: str | None = None, split: str = "test",
              columns: tuple[str, ...] = (), schema: str = "the hub dataset's",
              cache: Path | None = None) -> list[dict]:
    """Rows of a copy as dicts, after checking it has every one of ``columns`` (CopyError
    naming the first missing one, the copy's columns and ``schema``)."""
    ds = open_copy(path, name=name, split=split, cache=cache)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise CopyError(f"'{path}' has no column '{missing[0]}' (its columns: {', '.join(ds.column_names)}): "
                        f"give a copy with {schema} columns ({', '.join(columns)})")
    return ds.to_list()


def load_copy(task: str, path: str, name: str | None = None, split: str = "test",
              cache: Path | None = None) -> tuple[list[dict], str]:
    """``(rows, digest)`` of a user's copy of ``task``: the rows in ``benchmarks``' schema and a
    short digest of their content (the same set stored as JSONL or parquet has the same one)."""
    field = f"eval.datasets.{task}"
    if task not in COPY_COLUMNS:
        raise CopyError(f"{field}: '{task}' is not a built-in task ({', '.join(COPY_COLUMNS)})")
    try:
        raw = read_copy(path, name=name, split=split, columns=COPY_COLUMNS[task], schema=SCHEMAS[task],
                        cache=cache)
        rows = task_rows(task, raw, f"'{path}'")
    except AssetError as exc:
        raise CopyError(f"{field}: {exc}") from None
    if not rows:
        raise CopyError(f"{field}: '{path}' holds no rows: give a copy of the task's items")
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
    return rows, hashlib.sha256(text).hexdigest()[:8]
