"""Every name a config, a sweep metric or a tracker refers to, defined once.

Benchmark tasks and the metrics each one reports (as lm-evaluation-harness names them), the
held-out and training-set losses, the bundled held-out sets, the embedded training mixes, the
label mask, and which way each metric is optimised. ``config/schema.py`` validates against
these, ``evaluation/`` produces them, ``config/sweep.py`` accepts them as a sweep's metric.
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
TRAIN_SET_LOSS = "eval/train/loss"  # eval.train_loss: the held-out loss's measure on training examples
# what a sweep can optimise: the training loss, the held-out loss, the training-set loss, any
# benchmark metric
METRICS: tuple[str, ...] = ("train/loss", HELDOUT_LOSS, TRAIN_SET_LOSS) + tuple(
    f"eval/{task}/{metric}" for task in TASKS for metric in TASK_METRICS[task])
EMBEDDED_MIXES = ("embedded-mix", "embedded-mix-small")  # built from offline benchmark data
HELDOUT_NAMES = ("gsm8k-heldout",)  # the 319 GSM8K problems the embedded mix never trains on
IGNORE = -100  # label of a token that is not scored (the prompt, padding): torch's ignore_index


# lower is better when a metric's last path segment contains one of these (train/loss,
# eval/heldout/loss, lm-eval's perplexity, word_perplexity, byte_perplexity, bits_per_byte)
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


def direction(metric: str) -> str:
    """The sweep mode of ``metric``: min for a loss, a perplexity or bits per byte (its last
    path segment contains one of ``LOWER_IS_BETTER``), else max (accuracies, exact matches)."""
    last = metric.rsplit("/", 1)[-1]
    return "min" if any(word in last for word in LOWER_IS_BETTER) else "max"


def harness_metric_task(metric: str) -> str | None:
    """The task of an ``eval/<task>/<metric>`` name that is not a built-in one (an
    lm-evaluation-harness task's metric, e.g. eval/hellaswag/acc_norm), else None. Whether the
    task is scored is the run config's business (``eval.harness.tasks``)."""
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "eval" or not parts[1] or not parts[2]:
        return None
    return None if parts[1] in TASKS or parts[1] in ("heldout", "train") else parts[1]
CHAT_TEMPLATES = ("chatml", "llama-2", "vicuna_v1.1", "plain")  # model.chat_template by name (assets/templates.py)
