"""Every name a config, a sweep metric or a tracker refers to, defined once.

Benchmark tasks and the metrics each one reports (as lm-evaluation-harness names them), the
held-out loss, the bundled held-out sets, the embedded training mixes, the label mask, and which
way each metric is optimised. ``config/schema.py`` validates against these, ``evaluation/``
produces them, ``config/sweep.py`` accepts them as a sweep's metric.
"""

from __future__ import annotations

import typing
from typing import Literal

Task = Literal["gsm8k", "mmlu", "arc_easy", "arc_challenge"]
TASKS: tuple[str, ...] = typing.get_args(Task)
TASK_METRICS = {
    "gsm8k": ("strict", "flexible"),
    "mmlu": ("acc", "stem", "humanities", "social_sciences", "other"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
}
HELDOUT_LOSS = "eval/heldout/loss"
# what a sweep can optimise: the training loss, the held-out loss, any benchmark metric
METRICS: tuple[str, ...] = ("train/loss", HELDOUT_LOSS) + tuple(
    f"eval/{task}/{metric}" for task in TASKS for metric in TASK_METRICS[task])
EMBEDDED_MIXES = ("embedded-mix", "embedded-mix-small")  # built from offline benchmark data
HELDOUT_NAMES = ("gsm8k-heldout",)  # the 319 GSM8K problems the embedded mix never trains on
IGNORE = -100  # label of a token that is not scored (the prompt, padding): torch's ignore_index


def direction(metric: str) -> str:
    """The sweep mode of ``metric``: min for a loss (a last path segment containing "loss":
    train/loss, eval/heldout/loss), else max (accuracies, exact matches)."""
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"
CHAT_TEMPLATES = ("chatml", "llama-2", "vicuna_v1.1", "plain")  # model.chat_template by name (assets/templates.py)
