"""Names, keys and params of the tracking layout (docs/tracking_layout.md): pure functions of a
trial's values and run config, used by the driver when it creates a trial's run and by rank 0
when it logs metrics. No MLflow here."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from analysis.labels import config_label

TAG_CONFIG_ID = "plora.config_id"        # hash of the searched values without the seed
TAG_SEED = "plora.seed"

MAX_KEY_LENGTH = 250             # MLflow 3.17 (mlflow.utils.validation)
MAX_PARAM_VALUE_LENGTH = 6000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")
RUN_NAME_CHARS = 15  # what the MLflow UI's run list shows before it cuts a name with "..."


def sanitize_key(name: str) -> str:
    """A metric/param key MLflow accepts: alphanumerics and ``_ - . / space :``, no empty or
    ``.``/``..`` path segments, at most 250 characters (longer keys end in a short hash)."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    parts = [p.replace(".", "_") if p in (".", "..") else p for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = key[: MAX_KEY_LENGTH - 9].rstrip("/") + "~" + digest
    return key


def text_value(value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str:
    if isinstance(value, (list, tuple, set)):
        value = json.dumps(list(value), default=str)
    text = str(value)
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys (``{"lora": {"rank": 8}}`` -> ``{"lora.rank": "8"}``);
    lists as JSON, values cut to MLflow's 6000 characters, an empty dict kept as ``"{}"``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):  # pydantic models
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, full))
        else:
            out[sanitize_key(full)] = "{}" if isinstance(value, Mapping) else text_value(value)
    return out


def active_params(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config without what does not shape this run: the output directory and name
    (the same for every trial), the sections that do not apply (:func:`applicable`) and the
    evaluation settings when no task is scored."""
    cfg = applicable(run_config)
    for key in ("output_dir", "name"):
        cfg.pop(key, None)
    if not cfg.get("eval", {}).get("tasks"):
        cfg.pop("eval", None)
    return cfg


def logged_config(run_config: Mapping[str, Any], output: str) -> dict[str, Any]:
    """What a trial's ``config/run.yaml`` holds: its run config with ``output_dir`` set to
    where the trial wrote (its Ray Train run directory: checkpoints, ledger) and without the
    sections that do not apply to it (:func:`applicable`); it loads back as a run config."""
    return {**applicable(run_config), "output_dir": str(output)}


def applicable(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the run config without the sections that do not apply: the tiny model's
    shape unless the model is ``tiny``, PLoRA's section unless the method is plora, LoRA's for
    full fine-tuning, DeepSpeed's knobs under DDP."""
    cfg = json.loads(json.dumps(run_config, default=str))  # a deep copy of plain values
    method = cfg.get("method")
    if cfg.get("model", {}).get("name_or_path") != "tiny":
        cfg.get("model", {}).pop("tiny", None)
    if method != "plora":
        cfg.pop("plora", None)
    elif cfg["plora"].get("optimizer_on_unload") != "prune":
        cfg["plora"].pop("prune_ratio", None)
    if method == "full":
        cfg.pop("lora", None)
    dist = cfg.get("distributed", {})
    dist.pop("storage_path", None)
    if not dist.get("use_gpu"):
        dist.pop("gpus_per_worker", None)
    if dist.get("engine") != "deepspeed":
        dist.pop("zero_stage", None)
        dist.pop("offload_optimizer", None)
    return cfg


def run_name(values: Mapping[str, Any], seed: int, trial_id: str | None = None) -> str:
    """A short name from the searched values and the seed: ``u16 m0.1 r1 s0``.

    The MLflow UI shows about 15 characters; a longer name gets the trial's number in front
    so that names stay distinct where they are cut."""
    name = " ".join(filter(None, [config_label(values), f"s{seed}"]))
    number = str(trial_id or "").rsplit("_", 1)[-1]
    if len(name) > RUN_NAME_CHARS and number.isdigit():
        name = f"#{int(number)} {name}"
    return name


def config_id(values: Mapping[str, Any]) -> str:
    """A short hash of the searched values (no seed): the repeats of a configuration share it."""
    text = json.dumps({k: values[k] for k in sorted(values)}, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def trial_tags(values: Mapping[str, Any], seed: int) -> dict[str, str]:
    """``plora.config_id``, ``plora.seed`` and one ``space.<path>`` tag per searched value."""
    tags = {TAG_CONFIG_ID: config_id(values), TAG_SEED: str(seed)}
    tags.update({sanitize_key(f"space.{k}"): text_value(v, 5000) for k, v in values.items()})
    return tags


__all__ = ["MAX_KEY_LENGTH", "MAX_PARAM_VALUE_LENGTH", "RUN_NAME_CHARS", "TAG_CONFIG_ID", "TAG_SEED",
           "active_params", "applicable", "config_id", "flatten_params", "logged_config", "run_name",
           "sanitize_key", "text_value", "trial_tags"]
