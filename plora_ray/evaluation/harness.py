"""Any lm-evaluation-harness task by name, scored by lm-eval itself on the live model.

    metrics, items = harness_scores(model, tokenizer, cfg.eval.harness)

``model`` is the model as it trains (a peft-wrapped or plain ``PreTrainedModel``; under DDP the
unwrapped module, under DeepSpeed ``engine.module``): lm-eval's ``HFLM`` wraps it as it is (no
copy, no reload from disk) and ``lm_eval.simple_evaluate`` runs the tasks with lm-eval's own
defaults (seeds, bootstrap), so the numbers equal ``lm_eval --model hf`` on the saved model.

Names: lm-eval reports ``"<metric>,<filter>"`` (``acc,none``, ``acc_stderr,none``,
``exact_match,strict-match``). Each becomes ``eval/<task>/<metric>`` for the filter ``none``
and ``eval/<task>/<metric>_<filter>`` otherwise, its standard error ``..._stderr`` after
that (``eval/gsm8k/exact_match_strict-match_stderr``); an N/A standard error (one item, or
``bootstrap_iters: 0``) is left out. Every task and group in lm-eval's results is reported
(a group's subtasks under their own names).

Per-item records (``items``, the ``tasks`` part of ``items/step_*.json``): per task
``{"ids": ["<task>-<doc_id>", ...], <metric>: [...]}`` with the numeric per-document values
lm-eval logged (named as above), so two checkpoints' items pair up in ``analysis/``.

Distributed runs: call it on every rank with the same arguments; each rank scores every item
(no rank waits in a collective while another evaluates alone) and rank 0's result is broadcast
to all. Under ZeRO-3 that keeps the ranks in lockstep (every forward pass all-gathers the
partitioned weights, and every rank runs the same passes in the same order), as the built-in
evaluators' ``lockstep`` does. The model's train/eval mode and the global
random states (Python, NumPy, torch) are restored afterwards: training goes on as if nothing
had run.

``check_harness_tasks`` checks names against lm-eval's registry (``TaskManager``), with a
did-you-mean, before any work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import random
from typing import Any

__all__ = ["check_harness_tasks", "harness_scores", "metric_name", "task_manager"]

_MANAGERS: dict[tuple[str | None, bool], Any] = {}  # lm-eval's task index takes seconds to build


def task_manager(include_path: str | None, defaults: bool = True):
    """lm-eval's ``TaskManager`` over its own tasks (``defaults``) and ``include_path``; built
    once per process."""
    key = (include_path, defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=defaults)
    return _MANAGERS[key]


def _manager_for(tasks: list[str], include_path: str | None):
    """The user's folder alone when it defines every task (fast), else lm-eval's whole index."""
    if include_path:
        own = task_manager(include_path, defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return task_manager(include_path)


def check_harness_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """``ValueError`` (one line) naming the first task, group or tag lm-eval does not know, with
    the nearest known name; ``include_path`` adds a folder of task YAMLs to the registry."""
    if not tasks:
        return
    known = _manager_for(tasks, include_path).all_tasks
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    hint = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
    fix = f"did you mean '{hint[0]}'?" if hint else "see lm_eval --tasks list"
    where = f" or in {include_path}" if include_path else " (add your own YAMLs with eval.harness.include_path)"
    raise ValueError(f"field 'eval.harness.tasks': unknown lm-eval task '{unknown[0]}' (not in lm-eval's "
                     f"registry{where}): {fix}")


def metric_name(key: str) -> str:
    """lm-eval's ``"<metric>,<filter>"`` as this project names it (module docstring)."""
    metric, _, filt = key.partition(",")
    stderr = metric.endswith("_stderr")
    base = metric.removesuffix("_stderr")
    name = base if filt in ("", "none") else f"{base}_{filt}"
    return f"{name}_stderr" if stderr else name


def flatten_results(results: dict[str, dict]) -> dict[str, float]:
    """``eval/<task>/<metric>`` floats from ``simple_evaluate(...)["results"]``."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len; "N/A" standard errors
            if math.isnan(value):
                continue
            out[f"eval/{task}/{metric_name(key)}"] = float(value)
    return out


def items_from_samples(samples: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """Per-item records (module docstring) from ``simple_evaluate(..., log_samples=True)``."""
    out = {}
    for task, records in samples.items():
        rows: dict[int, dict[str, float]] = {}
        for r in records:
            row = rows.setdefault(r["doc_id"], {})
            filt = r.get("filter", "none")
            for metric in r.get("metrics", []):
                value = r.get(metric)
                if isinstance(value, (bool, int, float)):
                    row[metric_name(f"{metric},{filt}")] = float(value)
        ids = sorted(rows)
        names = list(dict.fromkeys(k for d in ids for k in rows[d]))
        entry = {"ids": [f"{task}-{d}" for d in ids]}
        for name in names:
            if all(name in rows[d] for d in ids):
                entry[name] = [rows[d][name] for d in ids]
        out[task] = entry
    return out


@contextlib.contextmanager
def _kept_state(model):
    """Restore the model's train/eval mode and the global random states afterwards (lm-eval
    seeds Python, NumPy and torch; HFLM puts the model in eval mode)."""
    import numpy as np
    import torch

    was_training = model.training
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model.train(was_training)


def harness_scores(model, tokenizer, cfg, *, rank: int = 0, world: int = 1,
                   lockstep: bool = False) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """``(metrics, items)`` of the tasks of ``cfg`` (an ``eval.harness`` HarnessConfig) on
    ``model`` as it is now; see the module docstring. ``({}, {})`` when no task is named.

    ``world`` > 1: call on every rank of an initialised ``torch.distributed`` group; every rank
    scores every item (``lockstep`` under ZeRO-3: generation also passes ``synced_gpus``, as
    the built-in GSM8K does) and rank 0's result is broadcast, so all ranks return it (lm-eval
    returns results only where ``LOCAL_RANK`` is 0)."""
    if not cfg.tasks:
        return {}, {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _manager_for(list(cfg.tasks), cfg.include_path)
    with _kept_state(model):
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=manager, log_samples=True,
                                      apply_chat_template=cfg.apply_chat_template,
                                      bootstrap_iters=cfg.bootstrap_iters,
                                      gen_kwargs={"synced_gpus": True} if lockstep and world > 1 else None)
    out = (flatten_results(res["results"]), items_from_samples(res.get("samples") or {})) if res else None
    if world > 1:
        import torch.distributed as dist

        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    if out is None:
        raise RuntimeError("lm-eval returned no results on rank 0 (LOCAL_RANK must be 0 there)")
    return out
