"""Training-data sources opened through ``datasets``: a hub id, a local file of any format
``datasets`` reads, a ``save_to_disk`` folder, a dataset folder, or a bundled name, with its
columns mapped onto a row shape :func:`plora_ray.assets.dialogues.to_messages` understands.

``open_source`` returns the mapped rows as a ``datasets.Dataset`` and a fingerprint of the data
alone (the tokenised cache key adds the tokenizer and length); ``check_source`` reads rows as
training will, so a bad source fails in the driver with one line naming
``data.sources[i].<field>`` and the fix. A hub id and a dataset folder take the same path
(``load_dataset(path, name, split=..., data_files=...)``).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from plora_ray.assets.dialogues import DataError, named_rows, read_rows, to_messages
from plora_ray.config.data import ROW_FIELDS, SourceConfig

# local files datasets reads, by suffix -> its packaged builder
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
            ".arrow": "arrow"}
CHECK_ROWS = 200  # rows of a large (hub / folder) source read by check_source


@contextmanager
def quiet():
    """No progress bars (workers' logs, one-line preflight errors) and no hub retry warnings."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    bars, level = not datasets.are_progress_bars_disabled(), hub_logging.get_verbosity()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _csv_kwargs(p: Path) -> dict:
    """Every CSV/TSV column read as text ("1." is an answer, not the float 1.0; "" is not NaN)."""
    import csv

    import datasets

    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    return {"delimiter": delimiter, "keep_default_na": False,
            "features": datasets.Features({c: datasets.Value("string") for c in header})}


def _where(i: int | None, field: str = "path") -> str:
    return f"data.sources[{i}].{field}" if i is not None else "data.train_files"


def is_saved_dataset(p: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _load(src: SourceConfig, i: int | None, cache: Path):
    """(raw rows, fingerprint of the data)."""
    import datasets

    rows = named_rows(src.path)
    if rows is not None:
        plain = [row for _, row in rows]
        digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
        return datasets.Dataset.from_list(plain), f"rows-{digest}"
    p = Path(src.path).expanduser()
    if p.is_file():
        builder = BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{_where(i)}: '{src.path}': datasets reads {', '.join(sorted(BUILDERS))} "
                            "files: convert it or give a dataset folder")
        kwargs = _csv_kwargs(p) if builder == "csv" else {}
        ds = datasets.load_dataset(builder, data_files=str(p.resolve()), split="train",
                                   cache_dir=str(cache / "raw"), **kwargs)
        return ds, f"file-{_digest(p)}"
    if p.is_dir() and is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{_where(i, 'split')}: '{src.split}' not in {src.path} (splits: "
                                f"{', '.join(ds)}): give one of them")
            ds = ds[src.split]
        return ds, f"disk-{ds._fingerprint}"
    if not p.exists() and src.path.startswith((".", "/", "~")):
        raise DataError(f"{_where(i)}: '{src.path}' not found: give an existing file or folder, a hub "
                        "dataset id, or a bundled name")
    try:  # a dataset folder, or a hub id (the same path)
        ds = datasets.load_dataset(src.path, src.name, split=src.split, data_files=src.data_files,
                                   cache_dir=str(cache / "raw"))
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        from huggingface_hub import constants

        offline = "offline" if datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE else \
            "not found or unreachable"
        raise DataError(f"{_where(i)}: '{src.path}' is not a local file or folder, and as a hub dataset "
                        f"it is {offline} ({' '.join(str(exc).split())[:160]}): check the id, or download "
                        "it (datasets' save_to_disk) and give the folder") from None
    except ValueError as exc:  # an unknown split or configuration name
        raise DataError(f"{_where(i, 'split')}: {src.path}: {' '.join(str(exc).split())[:240]}") from None
    return ds, f"hub-{ds._fingerprint}"


def map_columns(ds, src: SourceConfig, i: int | None):
    """Keep the rows ``where`` selects, rename the source's columns onto row fields
    (``columns``), keep only row fields, cap rows."""
    for col, values in src.where.items():
        if col not in ds.column_names:
            raise DataError(f"{_where(i, 'where.' + col)}: column '{col}' is not in {src.path} (its columns: "
                            f"{', '.join(sorted(ds.column_names))}): name one of them")
        wanted, before = set(values), ds
        ds = ds.filter(lambda v: v in wanted, input_columns=col)
        if not len(ds):
            present = sorted(map(str, before.unique(col)))
            raise DataError(f"{_where(i, 'where.' + col)}: no row of {src.path} has {col} in {values} (its "
                            f"values: {', '.join(present[:20])}{', ...' if len(present) > 20 else ''}): "
                            "name some of them")
    missing = {field: col for field, col in src.columns.items() if col not in ds.column_names}
    if missing:
        field, col = next(iter(missing.items()))
        raise DataError(f"{_where(i, 'columns.' + field)}: column '{col}' is not in {src.path} (its "
                        f"columns: {', '.join(sorted(ds.column_names))}): name one of them")
    renamed = {col: field for field, col in src.columns.items() if col != field}
    clashes = [c for c in ds.column_names if c in renamed.values() and c not in renamed]
    if clashes:  # a row field the source already has, replaced by a mapped column
        ds = ds.remove_columns(clashes)
    if renamed:
        ds = ds.rename_columns(renamed)
    keep = [c for c in ds.column_names if c in ROW_FIELDS]
    if src.columns and keep != ds.column_names:
        ds = ds.select_columns(keep)
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))
    return ds


def open_source(src: SourceConfig, i: int | None, cache: Path):
    """(rows of ``src`` mapped onto row fields, a fingerprint of the data and its mapping)."""
    ds, fingerprint = _load(src, i, cache)
    mapping = json.dumps([sorted(src.columns.items()), sorted(src.where.items()), src.max_rows])
    return map_columns(ds, src, i), f"{fingerprint}-{hashlib.sha256(mapping.encode()).hexdigest()[:8]}"


def plain_rows(src: SourceConfig, i: int | None) -> list[tuple[str, object]] | None:
    """(location, row) pairs read by the plain reader (which names a bad row's line), for a
    bundled name or a local json/jsonl/parquet file without a column map; else None. A
    data.train_files entry (``i`` None) must be one of those or a save_to_disk folder."""
    if src.columns or src.where:
        return None
    rows = named_rows(src.path)
    if rows is None:
        p = Path(src.path).expanduser()
        if i is None and not (p.is_dir() and is_saved_dataset(p)) and p.suffix.lower() not in BUILDERS:
            rows = [(f"{src.path}:{n}", row) for n, row in read_rows(p)]  # says what is wrong
        elif p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".parquet"):
            rows = [(f"{src.path}:{n}", row) for n, row in read_rows(p)]
        else:
            return None
    return rows[: src.max_rows] if src.max_rows is not None else rows


def check_source(src: SourceConfig, i: int | None, cache: Path) -> None:
    """Read the source as training will (every row of a local file, the first CHECK_ROWS of a
    folder or hub dataset), mapped, each row normalised to messages with an assistant turn."""
    rows = plain_rows(src, i)
    if rows is None:
        from datasets.exceptions import DatasetsError

        try:
            with quiet():
                ds, _ = open_source(src, i, cache)
        except DatasetsError as exc:
            raise DataError(f"{_where(i)}: {src.path}: {' '.join(str(exc).split())[:240]}") from None
        rows = [(f"{src.path}[{n}]", ds[n]) for n in range(min(len(ds), CHECK_ROWS))]
    if not rows:
        what = "the file holds no rows: give a file of conversations or remove it from data.train_files" \
            if i is None else "holds no rows: give a dataset of conversations or remove the source"
        raise DataError(f"{src.path}: {what}" if i is None else f"{_where(i)}: {src.path} {what}")
    for where, row in rows:
        row = {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row
        to_messages(row, where)


def check_data(data, cache: Path) -> None:
    """Every source of a DataConfig read and normalised as training will, without a tokenizer:
    a missing, broken, binary, empty, unmappable or assistant-less source fails here in the
    driver (DataError, one line) instead of in every worker. The embedded mixes are skipped:
    they are built from verified benchmark data."""
    from plora_ray.config.names import EMBEDDED_MIXES

    if data.sources is None:
        checks = [(None, SourceConfig(path=f)) for f in dict.fromkeys(data.train_files)]
    else:
        checks = list(enumerate(data.sources))
    for i, src in checks:
        if src.path not in EMBEDDED_MIXES:
            check_source(src, i, cache)
