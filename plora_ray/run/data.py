"""Training data: sources (:mod:`plora_ray.assets.sources`) -> tokenised examples with an
assistant-only loss mask (rows normalised by :mod:`plora_ray.assets.dialogues`), and the step plan (micro-batches grouped into
optimizer steps, short last step kept).
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from plora_ray.assets.dialogues import DataError, to_messages, tokenize_dialogue
from plora_ray.assets.sources import open_source, plain_rows, quiet
from plora_ray.config.names import IGNORE
from plora_ray.config.data import SourceConfig

TOKENIZE_VERSION = 1  # part of the cache key: bump when tokenize_dialogue's output changes


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable digest of what tokenisation depends on: vocabulary and merges, chat template,
    special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _tokenized(src: SourceConfig, i: int | None, tokenizer, max_length: int, cache: Path,
               num_proc: int | None = None):
    """Tokenise with ``datasets``' fingerprinted ``map``: the result is cached under ``cache``
    and a second load with the same data, mapping, tokenizer and max_length reads it back."""
    with quiet():  # no bars in workers' logs
        return _tokenize_rows(src, i, tokenizer, max_length, cache, num_proc)


def _tokenize_rows(src: SourceConfig, i: int | None, tokenizer, max_length: int, cache: Path,
                   num_proc: int | None = None):
    rows, source = open_source(src, i, cache)
    key = hashlib.sha256(json.dumps([TOKENIZE_VERSION, source, tokenizer_fingerprint(tokenizer),
                                     max_length]).encode()).hexdigest()[:24]

    def encode(row, index):
        row = {k: v for k, v in row.items() if v is not None}  # columns other row formats add
        return tokenize_dialogue(tokenizer, to_messages(row, f"{src.path}[{index}]"), max_length)

    cache_file = None
    if not rows.cache_files:  # an in-memory dataset caches where it is told to
        (cache / "tokenized").mkdir(parents=True, exist_ok=True)
        cache_file = str(cache / "tokenized" / f"{key}.arrow")
    out = rows.map(encode, with_indices=True, remove_columns=rows.column_names, new_fingerprint=key,
                   cache_file_name=cache_file, load_from_cache_file=True,
                   num_proc=num_proc if num_proc and num_proc > 1 and len(rows) >= num_proc else None)
    return out.data.table  # memory-mapped from datasets' cache file where it has one


def default_cache_dir() -> Path:
    from plora_ray.assets.fetch import cache_dir

    return cache_dir() / "datasets"


class Examples(Sequence):
    """Tokenised examples kept as Arrow (``input_ids``, ``labels``), memory-mapped from
    ``datasets``' cache where there is one, with an index of the rows in use: a worker holds no
    Python list of the whole set, and selecting rows (the held-out split, dropping unlabelled
    rows) copies no data. ``examples[i]`` is ``{"input_ids": [...], "labels": [...]}``; a slice
    is a list of those."""

    # what datasets writes for tokenize_dialogue's output: any other integer lists are cast (a copy)
    SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64()))])

    def __init__(self, table: pa.Table, rows: np.ndarray | None = None):
        if table.column_names != ["input_ids", "labels"]:
            table = table.select(["input_ids", "labels"])
        self.table = table if table.schema.equals(self.SCHEMA, check_metadata=False) else table.cast(self.SCHEMA)
        self._ids, self._labels = self.table.column("input_ids"), self.table.column("labels")
        self.rows = np.arange(self.table.num_rows, dtype=np.int64) if rows is None else \
            np.asarray(rows, dtype=np.int64)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Examples":
        return cls(pa.Table.from_pylist([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows],
                                        schema=cls.SCHEMA))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = int(self.rows[i])
        return {"input_ids": self._ids[j].as_py(), "labels": self._labels[j].as_py()}

    def __eq__(self, other) -> bool:
        if isinstance(other, (Examples, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def lengths(self) -> list[int]:
        return np.asarray(pc.list_value_length(self._ids))[self.rows].tolist()

    def select(self, indices) -> "Examples":
        return Examples(self.table, self.rows[np.asarray(indices, dtype=np.int64)])

    def labelled(self) -> "Examples":
        """The rows with a labelled token after the first (a row whose only label is its first
        token has nothing to predict)."""
        keep = []
        for chunk in self._labels.chunks:
            offsets = chunk.offsets.to_numpy()
            hit = np.concatenate([[0], np.cumsum(chunk.values.to_numpy(zero_copy_only=False) != IGNORE)])
            starts, ends = offsets[:-1], offsets[1:]
            keep.append(hit[ends] - hit[np.minimum(starts + 1, ends)] > 0)
        mask = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
        return Examples(self.table, self.rows[mask[self.rows]])


def weighted_rows(n: int, weight: float, key: str) -> np.ndarray:
    """Row indices of a source of ``n`` rows used ``weight`` times per epoch: each row
    ``floor(weight)`` times, plus a seeded choice (by ``key``) of ``round(frac * n)`` rows."""
    whole, frac = int(weight), weight - int(weight)
    rows = [np.tile(np.arange(n, dtype=np.int64), whole)]
    extra = round(frac * n)
    if extra:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        rows.append(np.sort(rng.choice(n, size=extra, replace=False)))
    return np.concatenate(rows)


def load_examples(sources: list[str | SourceConfig], tokenizer, max_length: int,
                  cache_dir: str | Path | None = None, cache: bool = True,
                  num_proc: int | None = None) -> Examples:
    """Tokenised examples of every source, in order (a plain string is a data.train_files
    entry), each source's rows used ``weight`` times (:func:`weighted_rows`: an index, no
    copy); rows without a labelled token (after truncation) are dropped.

    With ``cache`` (the default) each source is loaded, mapped and tokenised through
    ``datasets`` and its cache under ``cache_dir`` (default ``<plora_ray cache>/datasets``), so
    the trials of a sweep tokenise a source once. A local file ``datasets`` cannot read (or a
    bad row) goes through the plain reader, which names the file and line of the problem.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tables, rows, offset = [], [], 0
    for i, src in enumerate(sources):
        i, src = (None, SourceConfig(path=src)) if isinstance(src, str) else (i, src)
        plain = plain_rows(src, i)
        table = None
        if cache or plain is None:
            from datasets.exceptions import DatasetsError

            try:
                table = _tokenized(src, i, tokenizer, max_length, root, num_proc)
            except (DataError, DatasetsError, ValueError, TypeError, KeyError, OSError) as exc:
                if plain is None:  # no plain reader to say more: say what datasets said
                    if isinstance(exc, DataError):
                        raise
                    raise DataError(f"{src.path}: {' '.join(str(exc).split())[:240]}") from None
        if table is None:
            table = Examples.from_rows([tokenize_dialogue(tokenizer, to_messages(row, where), max_length)
                                        for where, row in plain]).table
        tables.append(Examples(table).table)
        n = tables[-1].num_rows
        rows.append(offset + (weighted_rows(n, src.weight, f"{i}/{src.path}") if src.weight != 1
                              else np.arange(n, dtype=np.int64)))
        offset += n
    examples = Examples(pa.concat_tables(tables), np.concatenate(rows)).labelled()
    if not len(examples):
        raise DataError(f"{', '.join(s if isinstance(s, str) else s.path for s in sources)}: no example "
                        "with assistant tokens within data.max_length: raise data.max_length or check the data")
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tokens": mask.sum()}


def pack(examples: list[dict], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch with its examples packed into rows of at most ``max_length`` tokens
    (first fit, longest first) instead of each padded to the longest: no attention mask;
    ``position_ids`` restart at 0 for every example (transformers' padding-free format: its
    attention then keeps each example to itself), and each example's first label is
    ``IGNORE``, so no example's token is predicted from another's: the targets are exactly
    the unpacked batch's. A row's unused tail is padding, a segment of its own that no real
    token attends to (it comes last) and that has no target."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        r = next((r for r, free in enumerate(room) if n <= free), None)
        if r is None:
            rows.append([i])
            room.append(max(max_length, n) - n)
        else:
            rows[r].append(i)
            room[r] -= n
    used = [sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e["input_ids"])
            ids[r, at: at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1: at + n] = torch.tensor(e["labels"][1:], dtype=torch.long)
            position[r, at: at + n] = torch.arange(n)
            at += n
        position[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": position,
            "tokens": torch.tensor(sum(used))}


@dataclass
class StepPlan:
    """Which examples each optimizer step uses: a list of micro-batches of indices.

    Per epoch the indices are shuffled with (seed, epoch); an epoch's last micro-batch
    and last step may be short (all data is used).

    With ``lengths`` (one per example) the micro-batches are length-grouped, as Hugging Face's
    ``LengthGroupedSampler`` does: the shuffled order is cut into mega-batches of
    ``GROUP_MICRO_BATCHES`` micro-batches, each sorted by length (longest first) and cut into
    micro-batches; consecutive micro-batches form the steps, whose order is then shuffled with
    (seed, epoch) (a short last step stays last). Rows of a micro-batch then have similar
    lengths, so little of it is padding, and so do the micro-batches of one step: the
    data-parallel ranks, which share a step's micro-batches, get similar work (with one
    micro-batch per step the plan is the same as shuffling micro-batches).
    """

    num_examples: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    epochs: int = 1
    seed: int = 0
    shuffle: bool = True
    lengths: list[int] | None = None

    GROUP_MICRO_BATCHES = 50

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        order = list(range(self.num_examples))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        m = self.micro_batch_size
        if self.lengths is not None:
            if len(self.lengths) != self.num_examples:
                raise ValueError(f"{len(self.lengths)} lengths for {self.num_examples} examples")
            mega = m * self.GROUP_MICRO_BATCHES
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s: s + mega], key=lambda i: -self.lengths[i])]
        micro = [order[i: i + m] for i in range(0, len(order), m)]
        k = self.gradient_accumulation_steps
        steps = [micro[i: i + k] for i in range(0, len(micro), k)]
        if self.lengths is not None and self.shuffle:
            short = int(bool(steps) and (len(steps[-1]) < k or len(steps[-1][-1]) < m))
            head = steps[: len(steps) - short]
            random.Random(f"{self.seed}/{epoch}/groups").shuffle(head)
            steps = head + steps[len(head):]
        return steps

    def steps(self) -> list[list[list[int]]]:
        return [s for e in range(self.epochs) for s in self.epoch_steps(e)]
