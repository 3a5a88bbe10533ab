"""The DeepSpeed config of a run: what the run config determines, merged with the user's own JSON.

``distributed.deepspeed_config`` names a DeepSpeed JSON (bucket sizes, ``overlap_comm``,
offload, ``communication_data_type``, ...). Everything in it reaches DeepSpeed, except that the
keys the run config determines (:func:`determined`: batch sizes, precision, ZeRO stage, the
optimizer and its hyper-parameters, clipping, optimizer offload when ``offload_optimizer`` is
set) must agree with it: a key set to another value is refused in one line naming both sources,
never silently overridden. ``"auto"`` (as Hugging Face and accelerate JSONs write it) takes the
run config's value; the three bucket sizes that depend on the model's width take Hugging Face's
formulas (``reduce_bucket_size`` = hidden², ``stage3_prefetch_bucket_size`` = 0.9·hidden²,
``stage3_param_persistence_threshold`` = 10·hidden). A ``scheduler`` section is refused unless
all its values are ``"auto"`` (the LR schedule is ``optim.scheduler``'s: PLoRA restarts it at
each unload).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from plora_ray.config.paths import use_extensions_dir
from plora_ray.config.schema import ConfigError, RunConfig

FIELD = "field 'distributed.deepspeed_config'"
# "auto" bucket sizes, as transformers' HfTrainerDeepSpeedConfig fills them from the width
HIDDEN_AUTO = {"zero_optimization.reduce_bucket_size": lambda h: h * h,
               "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
               "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h}
OFFLOADING = ("cpu", "nvme")


def determined(cfg: RunConfig, world: int) -> dict[str, tuple[Any, str]]:
    """``{DeepSpeed key (dotted): (value, the run-config field that sets it)}``."""
    d, o, data = cfg.distributed, cfg.optim, cfg.data
    out = {
        "train_micro_batch_size_per_gpu": (data.micro_batch_size, "data.micro_batch_size"),
        "gradient_accumulation_steps": (data.gradient_accumulation_steps, "data.gradient_accumulation_steps"),
        "train_batch_size": (cfg.samples_per_step(world), f"data.micro_batch_size x "
                             f"data.gradient_accumulation_steps x {world} worker(s)"),
        # the loop decides where a step ends (short last steps, uneven token counts)
        "managed_gradient_accumulation": (False, "the training loop (it ends each step itself)"),
        "gradient_clipping": (o.max_grad_norm or 0.0, "optim.max_grad_norm"),
        "optimizer.type": ("AdamW", "the run's optimizer (AdamW, section optim)"),
        "optimizer.params.lr": (o.lr, "optim.lr"),
        "optimizer.params.betas": (list(o.betas), "optim.betas"),
        "optimizer.params.eps": (o.eps, "optim.eps"),
        "optimizer.params.weight_decay": (o.weight_decay, "optim.weight_decay"),
        "zero_optimization.stage": (d.zero_stage, "distributed.zero_stage"),
        "bf16.enabled": (cfg.model.dtype == "bfloat16", f"model.dtype {cfg.model.dtype}"),
        "fp16.enabled": (False, f"model.dtype {cfg.model.dtype}"),
    }
    if d.offload_optimizer:
        out["zero_optimization.offload_optimizer.device"] = ("cpu", "distributed.offload_optimizer")
    return out


def read_user_config(path: str) -> dict:
    """The user's DeepSpeed JSON as a dict; ConfigError (one line naming the field) if it is
    missing, unreadable, not JSON or not an object."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{FIELD}: file '{path}' not found: give the path of your DeepSpeed JSON") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{FIELD}: cannot read '{path}' ({why}): give a readable UTF-8 JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{FIELD}: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{FIELD}: '{path}' must hold a JSON object of DeepSpeed keys (got "
                          f"{type(data).__name__})")
    if "bfloat16" in data:  # DeepSpeed's other name of the bf16 section
        if "bf16" in data:
            raise ConfigError(f"{FIELD}: '{path}' has both 'bf16' and 'bfloat16' sections: keep one")
        data["bf16"] = data.pop("bfloat16")
    return data


def _get(tree: dict, key: str, path: str):
    """(found, value) at the dotted ``key``; a non-object on the way is refused."""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            where = ".".join(parts[:i])
            raise ConfigError(f"{FIELD}: '{path}' has '{where}' = {json.dumps(node)}, which must be a JSON "
                              "object of DeepSpeed keys: fix the file")
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _same(theirs, ours) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return isinstance(theirs, bool) and isinstance(ours, bool) and theirs == ours
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return math.isclose(float(theirs), float(ours), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(theirs, ours))
    if isinstance(ours, str) and isinstance(theirs, str):
        return theirs.lower() == ours.lower()
    return False


def _autos(tree, prefix: str = ""):
    """Dotted keys whose value is "auto"."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif tree == "auto":
        yield prefix[:-1]


def _merge(cfg: RunConfig, world: int, user: dict, path: str, hidden_size: int | None) -> dict:
    user = copy.deepcopy(user)
    scheduler = user.pop("scheduler", None)
    if scheduler is not None and (scheduler != "auto" and not (
            isinstance(scheduler, dict) and all(v == "auto" for v in (scheduler.get("params") or {}).values()))):
        raise ConfigError(f"{FIELD}: '{path}' sets a scheduler, but the LR schedule is optim.scheduler / "
                          "optim.warmup_steps (PLoRA restarts it at each unload): remove the section")
    for key, (ours, field) in determined(cfg, world).items():
        found, theirs = _get(user, key, path)
        if not found or theirs == "auto":
            _set(user, key, ours)
        elif not _same(theirs, ours):
            raise ConfigError(f"{FIELD}: '{path}' sets {key} {json.dumps(theirs)} but {field} gives "
                              f"{json.dumps(ours)}: make them agree (or write \"auto\" in the JSON)")
    for key in list(_autos(user)):
        if key not in HIDDEN_AUTO:
            raise ConfigError(f"{FIELD}: '{path}' sets {key} \"auto\", which only the keys the run config "
                              f"determines and {', '.join(k.rsplit('.', 1)[1] for k in HIDDEN_AUTO)} take: "
                              "give a value or remove it")
        zero = user["zero_optimization"]
        name = key.rsplit(".", 1)[1]
        if hidden_size:
            zero[name] = HIDDEN_AUTO[key](hidden_size)
        else:
            del zero[name]  # the width is unknown (a check without the model): DeepSpeed's default
    zero = user["zero_optimization"]
    found, device = _get(user, "zero_optimization.offload_optimizer.device", path)
    offload = found and device in OFFLOADING
    if offload and zero["stage"] == 0:
        raise ConfigError(f"{FIELD}: '{path}' offloads the optimizer (zero_optimization.offload_optimizer), "
                          "which needs distributed.zero_stage 1-3: raise the stage or remove the offload")
    if zero["stage"] == 1 and zero.get("overlap_comm") is True:  # DeepSpeed asserts it in the worker
        raise ConfigError(f"{FIELD}: '{path}' sets zero_optimization.overlap_comm true, which DeepSpeed "
                          "supports with ZeRO stage 2-3 only when the loop ends each step itself: remove it "
                          "or raise distributed.zero_stage")
    found, device = _get(user, "zero_optimization.offload_param.device", path)
    if found and device in OFFLOADING and zero["stage"] != 3:
        raise ConfigError(f"{FIELD}: '{path}' offloads parameters (zero_optimization.offload_param), which "
                          "needs distributed.zero_stage 3: set it, or remove the offload")
    # torch's AdamW unless DeepSpeed's CPU Adam runs the offloaded step (the JSON may choose)
    user["optimizer"]["params"].setdefault("torch_adam", not offload)
    user.setdefault("steps_per_print", 10**9)
    user.setdefault("wall_clock_breakdown", False)
    return user


def deepspeed_config(cfg: RunConfig, world: int, hidden_size: int | None = None) -> dict:
    """The config ``deepspeed.initialize`` (and ``zero.Init``) gets for ``world`` workers: the
    run config's keys, merged with ``distributed.deepspeed_config`` when one is given;
    ``hidden_size`` fills the width-dependent "auto" bucket sizes. ConfigError (one line) for a
    bad file or a conflict."""
    path = cfg.distributed.deepspeed_config
    user = read_user_config(path) if path else {}
    return _merge(cfg, world, user, path or "", hidden_size)


def check_deepspeed_config(cfg: RunConfig) -> dict | None:
    """Before any work: the user's JSON merged (conflicts refused) and validated by DeepSpeed's
    own config classes (a misspelt key, a bad value); returns the merged config, or None when
    there is no user JSON to check. ConfigError (one line)."""
    d = cfg.distributed
    if d.engine != "deepspeed" or not d.deepspeed_config:
        return None
    merged = deepspeed_config(cfg, d.workers)
    from pydantic import ValidationError

    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in merged.items() if k != "train_batch_size"}  # checked above, for d.workers
    try:
        DeepSpeedConfig(probe)  # this process is no worker: world size 1
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{FIELD}: '{d.deepspeed_config}': DeepSpeed rejects {exc.title} {where}: "
                          f"{err['msg']}: fix the file") from None
    except (ValueError, AssertionError, TypeError, KeyError) as exc:
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{FIELD}: '{d.deepspeed_config}': DeepSpeed rejects it ({first[:300]}): "
                          "fix the file") from None
    return merged


def prepare_deepspeed(init_distributed: bool = False) -> None:
    """Before this process first starts DeepSpeed's communication (``deepspeed.initialize`` or
    ``init_distributed``): JIT-built ops go to the cache root's per-environment folder, and its
    shared-memory all-reduce (``deepspeed_shm_comm``, which ``init_distributed`` JIT-builds on
    the CPU: ≈ 20 s on 2 cores, once per environment) is not built. Only
    ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism) calls it, and that falls
    back to ``torch.distributed.all_reduce`` without it; training's collectives never use it.
    ``init_distributed``: then start DeepSpeed's communication (``deepspeed.init_distributed``)."""
    use_extensions_dir()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if (builder := get_accelerator().create_op_builder("ShareMemCommBuilder")) is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    if init_distributed:
        deepspeed.init_distributed()
