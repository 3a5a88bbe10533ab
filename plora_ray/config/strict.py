"""The base of every config model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Every config model: an unknown key is an error, and so is a bad value set later; no
    number may be inf or nan (``lr: .inf`` would pass ``gt=0`` and fail after a step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
