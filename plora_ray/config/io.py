"""Reading run configs: YAML files, ``key=value`` overrides and one-line errors.

Bad input never raises a traceback at the user: :func:`load_run_config` and
:func:`build_run_config` turn every problem (a missing or binary file, invalid YAML, a key given
twice, an unknown key, a bad value) into :class:`ConfigError`, whose message is one line naming
the field and the fix ("did you mean ..." for a misspelt key). Both resolve ``model.dtype: auto``
(:func:`plora_ray.config.hardware.resolve_dtype`): the config they return is the one to run.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from plora_ray.config.hardware import resolve_dtype
from plora_ray.config.names import CHAT_TEMPLATES
from plora_ray.config.data import BUNDLED_DATASETS
from plora_ray.config.schema import ConfigError, RunConfig


def _known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_known_paths(ann, path + "."))
    return out


# names researchers bring from transformers / peft / other trainers
ALIASES = {"learning_rate": "lr", "r": "rank", "lora_r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "batch_size": "micro_batch_size",
           "per_device_train_batch_size": "micro_batch_size", "num_train_epochs": "epochs",
           "model_name_or_path": "name_or_path", "gradient_accumulation": "gradient_accumulation_steps",
           "lr_scheduler_type": "scheduler", "warmup": "warmup_steps", "target_layers": "target_modules"}


def nearest_key(path: str, model: type[BaseModel] = None) -> str | None:
    """The valid dotted key closest to ``path`` (for 'did you mean' messages)."""
    known = _known_paths(model or RunConfig)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    alias = ALIASES.get(path.rsplit(".", 1)[-1])
    if alias and parent + alias in known:
        return parent + alias
    same_level = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
    match = difflib.get_close_matches(path, same_level, n=1, cutoff=0.5) or difflib.get_close_matches(
        path, known, n=1, cutoff=0.6
    )
    return match[0] if match else None


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    etype = err["type"]
    if etype == "extra_forbidden":
        hint = nearest_key(loc, model)
        fix = f"did you mean '{hint}'?" if hint else "remove it"
        return f"unknown key '{loc}': {fix}"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    field = f"field '{loc}'" if loc else "config"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{field}: {msg}{got_s}"


def format_validation_error(exc: ValidationError, model: type[BaseModel] = None) -> str:
    errors = exc.errors()
    first = _describe(errors[0], model or RunConfig)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return first + more


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. lora.rank=4)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def flow(value: Any) -> str:
    """A value as one line of YAML (flow style): what ``key=value`` needs to read it back."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def apply_override(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ConfigError (one line) for a binary or undecodable file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror}): check its "
                          "permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text {what} file (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8): give the {what} file itself") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text {what} file (it holds NUL bytes): give the {what} "
                          "file itself")
    return text


def read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file; ConfigError (one line) for a missing, binary or
    invalid file, a top level that is not a mapping, or a key given twice in one mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found: check the path")
    try:
        data = yaml.load(read_text_file(p, "YAML"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{p} line {exc.line}: key '{exc.key}' is given twice in the same mapping "
                          "(the later one would silently win): keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{p}{where}: not valid YAML ({' '.join(str(reason).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (got {type(data).__name__})")
    return data


def build_run_config(data: dict, source: str = "config") -> RunConfig:
    """The RunConfig to run from a mapping: validated, ``model.dtype: auto`` resolved, data files
    and a local model directory checked; raises ConfigError (one line, prefixed by ``source``)."""
    try:
        cfg = resolve_dtype(RunConfig.model_validate(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None
    for f in cfg.data.train_files:
        if f not in BUNDLED_DATASETS and not Path(f).exists():
            raise ConfigError(
                f"{source}: field 'data.train_files': file '{f}' not found: give an existing "
                f"path or a bundled name ({', '.join(BUNDLED_DATASETS)})"
            )
    for i, src in enumerate(cfg.data.sources or []):
        if src.path.startswith((".", "/", "~")) and not Path(src.path).expanduser().exists():
            raise ConfigError(f"{source}: field 'data.sources[{i}].path': '{src.path}' not found: give an "
                              "existing file or folder, a hub dataset id, or a bundled name")
    t = cfg.model.chat_template
    if t is not None and t not in CHAT_TEMPLATES and "{{" not in t and "{%" not in t and not Path(t).expanduser().is_file():
        raise ConfigError(f"{source}: field 'model.chat_template': '{t}' is not a template name "
                          f"({', '.join(CHAT_TEMPLATES)}), a Jinja string or an existing .jinja file")
    if cfg.model.name_or_path != "tiny":
        looks_local = cfg.model.name_or_path.startswith((".", "/", "~"))
        if looks_local and not Path(cfg.model.name_or_path).expanduser().exists():
            raise ConfigError(
                f"{source}: field 'model.name_or_path': directory '{cfg.model.name_or_path}' "
                "not found: give a model directory, a hub id, or 'tiny'"
            )
    return cfg


def load_run_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read, override (``key=value``) and validate a run YAML; raises ConfigError."""
    data = read_yaml(path)
    if "base" in data:  # every sweep file names its base run; a run config has no such key
        raise ConfigError(f"{path}: a sweep file (it has a 'base'), not a run config: run it with "
                          f"python -m plora_ray.tune {path}")
    for item in overrides:
        apply_override(data, *parse_override(item))
    return build_run_config(data, source=str(path))
