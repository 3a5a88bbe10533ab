"""Per-item results in the compact form of ``items/step_*.json`` (docs/tracking_layout.md).

Why parallel lists keyed by stable ids: two trials scored on the same items can be compared
item by item (paired differences, McNemar) without storing the prompts or generations.
"""

from __future__ import annotations

__all__ = ["items_record"]

# per task: the record fields kept, in order (besides ids); accuracies as 0/1 ints
_FIELDS = {
    "heldout": (("loss", float), ("tokens", int)),
    "train": (("loss", float), ("tokens", int)),  # eval.train_loss: ids train-<index>
    "arc_easy": (("acc", int), ("acc_norm", int)),
    "arc_challenge": (("acc", int), ("acc_norm", int)),
    "mmlu": (("acc", int), ("category", None)),
    "gsm8k": (("strict_match", int), ("flexible_match", int)),
}
_NAMES = {"strict_match": "strict", "flexible_match": "flexible"}


def items_record(result) -> dict[str, dict[str, list]]:
    """The ``tasks`` part of ``items/step_*.json`` from an ``EvalResult`` (``.samples``):
    ``{task: {"ids": [...], <metric>: [...], ...}}`` with lists parallel to ``ids``."""
    out = {}
    for task, records in result.samples.items():
        fields = _FIELDS[task]
        entry = {"ids": [r["id"] for r in records]}
        for field, kind in fields:
            entry[_NAMES.get(field, field)] = [r[field] if kind is None else kind(r[field]) for r in records]
        out[task] = entry
    return out
