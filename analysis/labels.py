"""Short labels of searched values (``u16 m0.1 r1``): the summary's rows and the trial runs'
names (``plora_ray.tracking.naming.run_name``) use the same text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# short names of searched paths in run names (``u16 m0.1 r1 s0``); others use their initials
ABBREVIATIONS = {"plora.unload_every_samples": "u", "plora.unload_every_steps": "us",
                 "plora.momentum": "m", "plora.momentum_rule": "", "plora.optimizer_on_unload": "",
                 "plora.rewarmup_steps": "rw", "lora.rank": "r", "lora.alpha": "a", "optim.lr": "lr",
                 "method": "", "seed": "s", "data.micro_batch_size": "mb"}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def config_label(values: Mapping[str, Any]) -> str:
    """The searched values, short: ``u16 m0.1 r1`` (None values left out)."""
    parts = []
    for path, value in values.items():
        if value is not None:
            last = path.rsplit(".", 1)[-1]
            abbr = ABBREVIATIONS.get(path, "".join(w[:1] for w in last.split("_")))
            parts.append(f"{abbr}{_format_value(value)}")
    return " ".join(parts)


__all__ = ["ABBREVIATIONS", "config_label"]
