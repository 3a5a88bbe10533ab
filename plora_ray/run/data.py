"""Training data: conversation files -> tokenised examples with an assistant-only loss mask
(rows read by :mod:`plora_ray.assets.dialogues`), and the step plan (micro-batches grouped into
optimizer steps, short last step kept).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from plora_ray.assets.dialogues import DataError, file_rows, named_rows, to_messages, tokenize_dialogue
from plora_ray.config.names import IGNORE

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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _row_dataset(name: str, cache: Path):
    """(rows as a ``datasets.Dataset``, a fingerprint of the data alone): json/jsonl/parquet
    through ``load_dataset`` (fingerprint: the file's content), a ``save_to_disk`` directory
    through ``load_from_disk`` (its saved fingerprint), bundled and embedded names from their
    rows (fingerprint: the rows' content)."""
    import datasets

    rows = named_rows(name)
    if rows is not None:
        plain = [row for _, row in rows]
        digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
        return datasets.Dataset.from_list(plain), f"rows-{digest}"
    p = Path(name)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        return ds, f"disk-{ds._fingerprint}"
    builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}[p.suffix.lower()]
    ds = datasets.load_dataset(builder, data_files=str(p.resolve()), split="train", cache_dir=str(cache / "raw"))
    return ds, f"file-{_file_digest(p)}"


def _tokenized(name: str, tokenizer, max_length: int, cache: Path) -> list[dict]:
    """Tokenise with ``datasets``' fingerprinted ``map``: the result is cached under ``cache``
    and a second load with the same data, tokenizer and max_length reads it back."""
    import datasets

    verbose = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # no bars in workers' logs
    try:
        return _tokenize_rows(name, tokenizer, max_length, cache)
    finally:
        if verbose:
            datasets.enable_progress_bars()


def _tokenize_rows(name: str, tokenizer, max_length: int, cache: Path) -> list[dict]:
    rows, source = _row_dataset(name, cache)
    key = hashlib.sha256(json.dumps([TOKENIZE_VERSION, source, tokenizer_fingerprint(tokenizer),
                                     max_length]).encode()).hexdigest()[:24]

    def encode(row, index):
        row = {k: v for k, v in row.items() if v is not None}  # columns other row formats add
        return tokenize_dialogue(tokenizer, to_messages(row, f"{name}[{index}]"), max_length)

    cache_file = None
    if not rows.cache_files:  # an in-memory dataset caches where it is told to
        (cache / "tokenized").mkdir(parents=True, exist_ok=True)
        cache_file = str(cache / "tokenized" / f"{key}.arrow")
    out = rows.map(encode, with_indices=True, remove_columns=rows.column_names, new_fingerprint=key,
                   cache_file_name=cache_file, load_from_cache_file=True)
    cols = out.to_dict()
    return [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"])]


def default_cache_dir() -> Path:
    from plora_ray.assets.fetch import cache_dir

    return cache_dir() / "datasets"


def load_examples(files: list[str], tokenizer, max_length: int, cache_dir: str | Path | None = None,
                  cache: bool = True) -> list[dict]:
    """Tokenised examples of every file, in order; rows without a labelled token (after
    truncation) are dropped.

    With ``cache`` (the default) each file is loaded and tokenised through ``datasets`` and
    its cache under ``cache_dir`` (default ``<plora_ray cache>/datasets``), so the trials of a
    sweep tokenise a file once. Whatever ``datasets`` cannot read (or a bad row) goes through
    the plain reader, which names the file and line of the problem.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    examples = []
    for f in files:
        encoded = None
        if cache:
            from datasets.exceptions import DatasetsError

            try:
                encoded = _tokenized(f, tokenizer, max_length, root)
            except (DataError, DatasetsError, ValueError, TypeError, KeyError, OSError):
                encoded = None  # the plain path below reports data errors precisely
        if encoded is None:
            encoded = [tokenize_dialogue(tokenizer, to_messages(row, where), max_length)
                       for where, row in file_rows(f)]
        examples += [ex for ex in encoded if any(label != IGNORE for label in ex["labels"][1:])]
    if not examples:
        raise DataError(f"{', '.join(files)}: no example with assistant tokens within "
                        "data.max_length: raise data.max_length or check the files")
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
