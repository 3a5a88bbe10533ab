"""The ``eval`` section of a run config: held-out loss, built-in benchmarks, lm-eval tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from plora_ray.config.data import BUNDLED_DATASETS
from plora_ray.config.names import HELDOUT_NAMES, Task
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


class EvalConfig(Strict):
    """Benchmarks scored at every checkpoint (defined as lm-evaluation-harness defines them)."""

    tasks: list[Task] = Field(
        default_factory=list, description="empty: no benchmark (the held-out loss may still run)")
    final_only_tasks: list[Task] = Field(
        default_factory=list, description="tasks of eval.tasks scored only at the final "
        "checkpoint (e.g. [gsm8k]: generation is slow); the others run at every checkpoint")
    heldout: HeldoutConfig = HeldoutConfig()
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
    gsm8k_items: Literal["auto", "test", "heldout"] = Field(
        "auto", description="GSM8K problems scored: test (the whole 1,319-problem test set, as the "
        "paper and lm-eval), heldout (the 319 the embedded mix never trains on); auto: heldout when "
        "training on an embedded mix, else test. Resolved when the config is built, so config.yaml "
        "and MLflow record which (ids gsm8k-test-<i> / gsm8k-heldout-<i>: two sets never pair)")
    harness: HarnessConfig = Field(
        default_factory=lambda: HarnessConfig(), description="any lm-evaluation-harness task by "
        "name, scored by lm-eval itself on the live model (eval/<task>/<metric>)")

    @model_validator(mode="after")
    def _final_only_in_tasks(self) -> "EvalConfig":
        for t in self.final_only_tasks:
            if t not in self.tasks:
                raise ValueError(f"final_only_tasks names '{t}', which is not in eval.tasks: "
                                 "add it to eval.tasks or remove it")
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
            if not t.strip() or "/" in t or t == "heldout":
                raise ValueError(f"harness task name {t!r}: give an lm-eval task, group or tag name "
                                 "(no '/'; 'heldout' is eval.heldout's)")
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
