"""The ``data`` section of a run config: training sources and how they become batches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from plora_ray.config.names import EMBEDDED_MIXES
from plora_ray.config.strict import Strict

BUNDLED_DATASETS = ("tiny-dialogues", *EMBEDDED_MIXES)  # names resolved by plora_ray.run.data

ROW_FIELDS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "question",
              "choices", "answer", "subject", "system")


class SourceConfig(Strict):
    """One training-data source, opened through ``datasets`` (``load_dataset`` /
    ``load_from_disk``) and mapped onto a row shape the loader understands: messages,
    ShareGPT conversations, alpaca instruction/input/output, prompt/completion, or multiple
    choice question/choices/answer."""

    path: str = Field(description="a hub dataset id, a local json/jsonl/parquet/csv/arrow file, a "
                      "save_to_disk folder, a dataset folder, or a bundled name "
                      f"({', '.join(BUNDLED_DATASETS)})")
    name: str | None = Field(None, description="the dataset's configuration (load_dataset's name)")
    split: str = Field("train", description="the split to train on")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="load_dataset's data_files (files inside a hub or folder dataset)")
    columns: dict[Literal[ROW_FIELDS], str] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="row field -> the source's column, e.g. {prompt: question, "
        "completion: answer}; fields: " + ", ".join(ROW_FIELDS))
    where: dict[str, list[str | int | bool]] = Field(
        default_factory=dict, description="keep rows whose column holds one of these values, e.g. "
        "{dataset: [open_orca, code_alpaca]} (before the column map)")
    max_rows: int | None = Field(None, ge=1, description="train on the first N rows only (after where)")
    weight: float = Field(1.0, gt=0, description="how many times each row is used per epoch: 2: "
                          "twice, 0.5: a seeded half (after max_rows); the mix's proportions")


class DataConfig(Strict):
    train_files: list[str] = Field(
        default_factory=lambda: ["tiny-dialogues"],
        min_length=1,
        description="json/jsonl/parquet files (messages, conversations, alpaca or prompt/completion "
        f"rows), or a bundled name: {', '.join(BUNDLED_DATASETS)}; the short form of data.sources",
    )
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="datasets mixed into one training set, in order (each a "
        "hub id, file or folder with split, name, data_files, columns, max_rows); replaces "
        "data.train_files")
    max_length: int = Field(512, ge=8, description="tokens per example (truncated)")
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(6, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    shuffle: bool = True
    group_by_length: bool = Field(
        False, description="length-grouped micro-batches (rows of similar length together: "
        "less padding, faster steps; the step order stays seeded and shuffled)")
    packing: bool = Field(
        False, description="pack several examples into each row of a micro-batch (up to "
        "data.max_length tokens): no padding. Every example keeps its own loss and position ids "
        "restarting at 0; where the attention backend isolates them (transformers' padding-free "
        "path: sdpa, eager, flash_attention_2) each attends only to itself")
    num_proc: int | None = Field(None, ge=1, description="processes that tokenise a source "
                                 "(datasets' map num_proc); null: one")
    tokenize_cache: bool = Field(
        True, description="tokenise each file once through the datasets cache (every trial of "
        "a sweep reads it back)")
    cache_dir: str | None = Field(
        None, description="where datasets caches raw and tokenised rows; null: "
        "<PLORA_RAY_CACHE or ~/.cache/plora_ray>/datasets")

    @model_validator(mode="after")
    def _one_form(self) -> "DataConfig":
        # a dumped config (on its way to the workers) carries the default train_files: not a choice
        if self.sources is not None and "train_files" in self.model_fields_set and \
                self.train_files != DataConfig.model_fields["train_files"].get_default(call_default_factory=True):
            raise ValueError("give data.sources or data.train_files, not both (a file in train_files "
                             "is the source {path: FILE})")
        return self

    def all_sources(self) -> list[SourceConfig]:
        """The sources to train on: data.sources, or one per data.train_files entry."""
        return list(self.sources) if self.sources is not None else [SourceConfig(path=f) for f in self.train_files]

    def paths(self) -> list[str]:
        return [s.path for s in self.all_sources()]

    def embedded(self) -> bool:
        """Whether any source is an embedded mix (built from the benchmarks' training splits)."""
        return any(p in EMBEDDED_MIXES for p in self.paths())
