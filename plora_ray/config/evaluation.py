"""The ``eval`` section of a run config: held-out loss, built-in benchmarks, lm-eval tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from plora_ray.config.data import BUNDLED_DATASETS
from plora_ray.config.names import HELDOUT_NAMES, TASKS, Task
from plora_ray.config.strict import Strict

class HeldoutConfig(Strict):
    """Held-out dialogues scored by teacher-forced loss at every checkpoint (``eval/heldout/loss``)."""

    files: list[str] | None = Field(
        None, description="dialogue files (data.train_files formats) or a bundled name "
        f"({', '.join(BUNDLED_DATASETS + HELDOUT_NAMES)}); null: gsm8k-heldout when training on "
        "an embedded mix, else none; []: none")
    fraction: float = Field(0.0, ge=0, lt=1, description="seeded fraction of the training "
                            "examples kept out of training and scored as held-out")
    seed: int = Field(0, description="seed of the fraction split (fixed, so trials of "
                      "different run seeds hold out the same examples)")
    limit: int | None = Field(None, ge=1, description="score only the first N held-out examples")

    @model_validator(mode="after")
    def _files_exist(self) -> "HeldoutConfig":
        for f in self.files or []:
            if f not in BUNDLED_DATASETS + HELDOUT_NAMES and not Path(f).exists():
                raise ValueError(f"file '{f}' not found: give an existing path or a bundled name "
                                 f"({', '.join(BUNDLED_DATASETS + HELDOUT_NAMES)})")
        return self


class TrainLossConfig(Strict):
    """A fixed subset of the training examples scored like the held-out ones (teacher-forced loss,
    assistant tokens) at every checkpoint (``eval/train/loss``): how much of the training set a
    run has absorbed."""

    limit: int | None = Field(ge=1, description="how many training examples, drawn with the seed "
                              "below from those the run trains on (after eval.heldout.fraction); "
                              "null: all of them")
    seed: int = Field(0, description="seed of the draw (fixed, so every trial and run seed of a "
                      "sweep on the same data scores the same examples)")


# the columns each built-in task reads from a user's copy: the hub datasets' own schemas
# (openai/gsm8k main, cais/mmlu, allenai/ai2_arc), so a copy of the hub dataset works as-is
COPY_COLUMNS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"), "mmlu": ("question", "subject", "choices", "answer"),
    "arc_easy": ("question", "choices", "answerKey"), "arc_challenge": ("question", "choices", "answerKey")}
COPY_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".gz")  # names that must exist


class BenchmarkCopy(Strict):
    """A user's own copy of a built-in task's items, read through ``datasets`` instead of the
    bundled one: a local json/jsonl/parquet/csv/arrow file (taken as the split), a
    ``save_to_disk`` folder, a dataset folder or a hub id. A plain string is the ``path``."""

    path: str = Field(description="a local file, a save_to_disk or dataset folder, or a hub dataset id "
                      "(e.g. openai/gsm8k); made absolute when it is local")
    name: str | None = Field(None, description="the dataset's configuration (load_dataset's name, e.g. "
                             "main for openai/gsm8k, ARC-Easy for allenai/ai2_arc, all for cais/mmlu)")
    split: str = Field("test", description="the split scored (a DatasetDict folder or a hub dataset; a "
                       "file is its own split)")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _local_path(self) -> "BenchmarkCopy":
        p = Path(self.path).expanduser()
        if p.exists():
            resolved = str(p.resolve())
            if resolved != self.path:
                self.path = resolved  # workers may run in another directory
        elif self.path.startswith((".", "/", "~")) or p.name.lower().endswith(COPY_SUFFIXES):
            raise ValueError(f"'{self.path}' not found: give an existing file or folder, or a hub dataset id")
        return self


class EvalConfig(Strict):
    """Benchmarks scored at every checkpoint (defined as lm-evaluation-harness defines them)."""

    tasks: list[Task] = Field(
        default_factory=list, description="empty: no benchmark (the held-out loss may still run)")
    final_only_tasks: list[Task] = Field(
        default_factory=list, description="tasks of eval.tasks scored only at the final "
        "checkpoint (e.g. [gsm8k]: generation is slow); the others run at every checkpoint")
    heldout: HeldoutConfig = HeldoutConfig()
    train_loss: TrainLossConfig | None = Field(
        None, description="the training-set loss at every checkpoint (eval/train/loss) on a seeded "
        "subset of the training examples, e.g. {limit: 64}; null: not scored")
    limit: int | None = Field(20, ge=1, description="items per task (MMLU: spread over subjects); "
                              "null: the whole test set")
    task_limits: dict[Task, int | None] = Field(
        default_factory=dict, description="per-task items, overriding eval.limit (e.g. {gsm8k: 5}: "
        "generation is slow)")
    limit_mode: Literal["first", "sample"] = "first"
    prompt_style: Literal["chat", "plain"] = Field("chat", description="chat: the training template")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="GSM8K generation length")
    gsm8k_items: Literal["auto", "test", "heldout", "custom"] = Field(
        "auto", description="GSM8K problems scored: test (the whole 1,319-problem test set, as the "
        "paper and lm-eval), heldout (the 319 the embedded mix never trains on), custom (your copy, "
        "eval.datasets.gsm8k: set by it); auto: custom with eval.datasets.gsm8k, else heldout when "
        "training on an embedded mix, else test. Resolved when the config is built, so config.yaml "
        "and MLflow record which (ids gsm8k-test-<i> / gsm8k-heldout-<i> / gsm8k-custom-<digest>-<i>: "
        "two sets never pair)")
    datasets: dict[Task, BenchmarkCopy] = Field(
        default_factory=dict, description="your own copy of a built-in task's items instead of the "
        "bundled one, e.g. {gsm8k: data/gsm8k_test.jsonl, arc_easy: {path: allenai/ai2_arc, name: "
        "ARC-Easy}}: a file, a save_to_disk or dataset folder, or a hub id (string, or {path, name, "
        "split}; split default test), with the hub dataset's columns (gsm8k: question, answer; mmlu: "
        "question, subject, choices, answer; ARC: question, choices {text, label}, answerKey); read "
        "before any work starts; item ids <task>-custom-<digest of the set>-<i>")
    harness: HarnessConfig = Field(
        default_factory=lambda: HarnessConfig(), description="any lm-evaluation-harness task by "
        "name, scored by lm-eval itself on the live model (eval/<task>/<metric>)")

    @field_validator("datasets", mode="before")
    @classmethod
    def _builtin_tasks(cls, value):
        for t in value if isinstance(value, dict) else ():
            if t not in TASKS:
                raise ValueError(f"'{t}' is not a built-in task ({', '.join(TASKS)}): an lm-eval task reads "
                                 "its own data (eval.harness.tasks, include_path for your own YAML)")
        return value

    @model_validator(mode="after")
    def _final_only_in_tasks(self) -> "EvalConfig":
        for t in self.final_only_tasks:
            if t not in self.tasks:
                raise ValueError(f"final_only_tasks names '{t}', which is not in eval.tasks: "
                                 "add it to eval.tasks or remove it")
        for t in self.datasets:
            if t not in self.tasks:
                raise ValueError(f"eval.datasets.{t} is given, but eval.tasks does not score {t}: add it "
                                 f"to eval.tasks or remove eval.datasets.{t}")
        if "gsm8k" in self.datasets and self.gsm8k_items in ("test", "heldout"):
            raise ValueError(f"eval.gsm8k_items {self.gsm8k_items} scores the bundled GSM8K, but "
                             "eval.datasets.gsm8k gives your own copy: set eval.gsm8k_items custom (or "
                             "auto), or remove eval.datasets.gsm8k")
        if "gsm8k" not in self.datasets and self.gsm8k_items == "custom":
            raise ValueError("eval.gsm8k_items custom scores your own GSM8K copy: give it in "
                             "eval.datasets.gsm8k, or set eval.gsm8k_items test, heldout or auto")
        if "gsm8k" in self.datasets and self.gsm8k_items != "custom":
            self.gsm8k_items = "custom"  # resolved here, so config.yaml and MLflow record it
        for t in self.harness.tasks:
            if t in self.tasks:
                raise ValueError(f"harness.tasks names '{t}', which eval.tasks scores too (both log "
                                 f"eval/{t}/...): keep it in one of them")
        return self


class HarnessConfig(Strict):
    """lm-evaluation-harness tasks scored with ``lm_eval.simple_evaluate`` on the in-memory model
    at checkpoints (``plora_ray.evaluation.harness``); names are checked against lm-eval's
    registry (plus ``include_path``) before any work starts."""

    tasks: list[str] = Field(
        default_factory=list, description="lm-eval task, group or tag names (e.g. [hellaswag, "
        "truthfulqa_mc2]); empty: none")
    include_path: str | None = Field(
        None, description="a folder of your own lm-eval task YAMLs (lm-eval's --include_path; "
        "local data: dataset_path: json, dataset_kwargs: {data_files: ...}); made absolute")
    num_fewshot: int | None = Field(None, ge=0, description="null: each task's own default")
    limit: int | None = Field(None, ge=1, description="first N documents per task (lm-eval's "
                              "--limit); null: all")
    batch_size: int = Field(8, ge=1)
    at: Literal["every", "last"] = Field("every", description="every checkpoint, or the final one only")
    apply_chat_template: bool = Field(False, description="lm-eval's --apply_chat_template")
    bootstrap_iters: int = Field(100000, ge=0, description="lm-eval's bootstrap resamples for the "
                                 "stderr of non-mean metrics (0: none)")

    @model_validator(mode="after")
    def _names_and_path(self) -> "HarnessConfig":
        for t in self.tasks:
            if not t.strip() or "/" in t or t in ("heldout", "train"):
                raise ValueError(f"harness task name {t!r}: give an lm-eval task, group or tag name "
                                 "(no '/'; 'heldout' and 'train' are eval.heldout's and eval.train_loss's)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("harness.tasks names a task twice: list each once")
        if self.include_path is not None:
            path = Path(self.include_path).expanduser()
            if not path.is_dir():
                raise ValueError(f"include_path '{self.include_path}' is not a folder: give the folder "
                                 "that holds your task YAMLs")
            resolved = str(path.resolve())
            if resolved != self.include_path:
                self.include_path = resolved  # workers may run in another directory
        return self
