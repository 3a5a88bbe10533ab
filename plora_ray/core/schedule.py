"""The learning-rate schedule of a PeriodicLoRA run: warm-up, then constant, linear or cosine
decay, restarted (or continued) at every unload, with an optional re-warm-up ramp after each."""

from __future__ import annotations

import math

import torch


class StageLR:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR`` that knows about unloads.

    ``kind``: constant | linear | cosine (decay to 0 over ``horizon_steps``), after a
    linear warm-up of ``warmup_steps``. ``on_unload='restart'`` counts the schedule from
    the last unload (the paper resets the scheduler state); ``'continue'`` ignores
    unloads. ``rewarmup_steps`` multiplies the LR by a linear ramp after every unload
    (ReLoRA's jagged schedule). Being a callable object, its state is saved by LambdaLR's
    ``state_dict``.
    """

    def __init__(self, kind="constant", warmup_steps=0, horizon_steps=None, on_unload="restart",
                 rewarmup_steps=0):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}")
        if on_unload not in ("restart", "continue"):
            raise ValueError(f"unknown scheduler_on_unload {on_unload!r}")
        if kind != "constant" and not horizon_steps:
            raise ValueError(f"schedule {kind!r} needs horizon_steps")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.horizon_steps = horizon_steps
        self.on_unload = on_unload
        self.rewarmup_steps = rewarmup_steps
        self.stage_start = 0
        self.unloads = 0

    def __call__(self, step: int) -> float:
        since = step - self.stage_start
        t = since if self.on_unload == "restart" else step
        f = 1.0
        if self.warmup_steps and t < self.warmup_steps:
            f = (t + 1) / self.warmup_steps
        elif self.kind != "constant":
            progress = min(1.0, (t - self.warmup_steps) / max(1, self.horizon_steps - self.warmup_steps))
            f = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.unloads and self.rewarmup_steps and since < self.rewarmup_steps:
            f *= (since + 1) / self.rewarmup_steps
        return f

    def mark_unload(self, step: int) -> None:
        self.unloads += 1
        self.stage_start = step


def make_scheduler(optimizer, schedule: StageLR) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Apply the lambda at the scheduler's current step now (after an unload)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
