"""When PeriodicLoRA unloads: after every N samples consumed, or every K optimizer steps."""

from __future__ import annotations

import time


class UnloadClock:
    """Decides when to unload, from samples actually consumed or optimizer steps.

    Call :meth:`step` once per optimizer step with the number of samples that step
    consumed (all micro-batches of the accumulation, all data-parallel workers). With
    ``every_samples = N`` an unload fires at the first step boundary at which the total
    number of samples reaches a multiple of N (exactly at k*N when steps align with it;
    several multiples crossed in one step give one unload). With ``every_steps = K``
    every K-th step unloads. With neither it never fires (plain LoRA).
    """

    def __init__(self, every_samples: int | None = None, every_steps: int | None = None):
        if every_samples is not None and every_steps is not None:
            raise ValueError("give every_samples or every_steps, not both")
        self.every_samples = every_samples
        self.every_steps = every_steps
        self.steps = 0
        self.samples = 0
        self.samples_since_unload = 0
        self.steps_since_unload = 0
        self.unloads = 0

    def step(self, samples: int) -> bool:
        if samples < 0:
            raise ValueError("samples must be >= 0")
        self.steps += 1
        self.samples += samples
        self.samples_since_unload += samples
        self.steps_since_unload += 1
        due = False
        if self.every_samples is not None and self.samples_since_unload >= self.every_samples:
            self.samples_since_unload %= self.every_samples
            due = True
        if self.every_steps is not None and self.steps_since_unload >= self.every_steps:
            due = True
        if due:
            self.steps_since_unload = 0
            self.unloads += 1
        return due

    def state_dict(self) -> dict:
        keys = ("steps", "samples", "samples_since_unload", "steps_since_unload", "unloads")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def lap(times: dict[str, float], key: str, since: float) -> float:
    """Add the wall time since ``since`` to ``times[key]``; the time now, for the next lap."""
    now = time.perf_counter()
    times[key] = times.get(key, 0.0) + now - since
    return now
