"""One entry point for all benchmarks: ``evaluate(model, tokenizer, tasks, limit, ...)``.

Why one function: the trainer calls it on every checkpoint (in-memory model, possibly peft-
wrapped) and the CLI calls it on a saved model; both get the same flat metric names, ready for
MLflow, and the per-item records for JSON output and the lm-eval agreement test.

Items: by default from ``plora_ray.assets.benchmarks`` (MMLU test, ARC test, GSM8K's whole test
set, or with ``gsm8k_items="heldout"`` GSM8K's 319 problems the embedded mix never trains on:
``eval.gsm8k_items`` picks them for a run on that mix); ``datasets={task: copy}``
(``eval.datasets``) reads a user's own copy of a task instead (a file, folder or hub id, through
``datasets``). ``items={"mmlu": [...], ...}`` overrides per task (tests pass hand-made rows).

Limit: ``limit`` items per task (a dict ``{task: n, "*": default}`` sets it per task), the first ones (``limit_mode="first"``, lm-eval's ``--limit``)
or a sample drawn with ``random.Random(seed)`` and kept in source order (``"sample"``). For
MMLU the limit is spread evenly over its 57 subjects (see ``select``), so every category stays
represented at any limit.

Ids: every item gets a stable ``id`` before selection (ARC's own id; otherwise
``<task>-<position in the task's full item list>``, ``gsm8k-test-<i>`` / ``gsm8k-heldout-<i>``
for the bundled GSM8K items, ``<task>-custom-<digest of the set>-<i>`` for a user's copy,
``eval.datasets``), so per-item results of two runs pair up (``records.items_record``) and
items of two different sets never do.

Distributed (``rank``, ``world``, ``lockstep``): each rank scores its share of every task and
the records are gathered; every rank returns the same complete result (``sharding.py``).
At a training checkpoint call :func:`evaluate_checkpoint`.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

from plora_ray.evaluation.gsm8k import evaluate_gsm8k
from plora_ray.evaluation.heldout import evaluate_heldout
from plora_ray.evaluation.kv_prefix import dense_head
from plora_ray.evaluation.multiple_choice import evaluate_arc, evaluate_mmlu
from plora_ray.evaluation.records import items_record
from plora_ray.evaluation.sharding import Shard

__all__ = ["TASKS", "EvalResult", "custom_items", "default_items", "evaluate", "evaluate_checkpoint", "select"]

from plora_ray.config.names import TASKS
PROMPT_STYLES = ("chat", "plain")
LIMIT_MODES = ("first", "sample")


class EvalResult(dict):
    """Flat ``{metric: float}`` (log it as is); ``.samples[task]`` holds per-item records."""

    def __init__(self, metrics: dict[str, float], samples: dict[str, list[dict]]):
        super().__init__(metrics)
        self.samples = samples

    def to_json(self) -> dict[str, Any]:
        return {"metrics": dict(self), "samples": self.samples}


def check_tasks(tasks, allow_empty: bool = False) -> list[str]:
    """Validated task list (``ValueError`` naming the unknown task and the valid ones)."""
    tasks = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks) if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not (tasks or allow_empty):
        what = f"unknown task {bad[0]!r}" if bad else "no task given"
        raise ValueError(f"{what}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def select(items: list[dict], limit: int | None, mode: str = "first", seed: int = 1234,
           key: str | None = None) -> list[dict]:
    """``limit`` items (all if None): the first ones or a seeded sample in source order.

    With ``key`` (MMLU's subject) the ``limit`` items are spread evenly over the groups: the
    same number from each (the first or a sample), the remainder from the first groups, so a
    small limit still covers every subject and category. (lm-eval's ``--limit`` counts per
    subject instead: ``limit * 57`` items, too many for a per-checkpoint evaluation on a CPU.)"""
    if mode not in LIMIT_MODES:
        raise ValueError(f"limit_mode must be one of {LIMIT_MODES}, got {mode!r}")
    if limit is None:
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if key is not None:
        groups: dict[Any, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it[key], []).append(i)
        order = list(groups.values())
        quota = [limit // len(order) + (n < limit % len(order)) for n in range(len(order))]
        keep = sorted(i for g, q in zip(order, quota) for i in _pick(g, q, mode, seed))
    else:
        keep = _pick(list(range(len(items))), limit, mode, seed)
    return [items[i] for i in keep]


def _pick(indices: list[int], limit: int, mode: str, seed: int) -> list[int]:
    if mode == "first" or limit >= len(indices):
        return indices[:limit]
    return sorted(random.Random(seed).sample(indices, limit))


def default_items(task: str, gsm8k_items: str = "test", datasets: dict | None = None) -> list[dict]:
    """Evaluation rows of ``task``: the user's copy when ``datasets`` (``eval.datasets``) has
    one (:func:`custom_items`), else the offline benchmark loaders': GSM8K's whole test set, or
    (``gsm8k_items="heldout"``) the 319 problems the embedded mix never trains on."""
    from plora_ray.assets import benchmarks

    if datasets and task in datasets:
        return custom_items(task, datasets[task])
    if task == "mmlu":
        return benchmarks.load_mmlu("test")
    if task in ("arc_easy", "arc_challenge"):
        return benchmarks.load_arc(task.split("_")[1], "test")
    if gsm8k_items == "heldout":
        from plora_ray.assets.mix import gsm8k_heldout

        return with_ids(gsm8k_heldout(), "gsm8k-heldout")
    if gsm8k_items != "test":
        raise ValueError(f"gsm8k_items must be test or heldout (custom: give eval.datasets.gsm8k), got "
                         f"{gsm8k_items!r}")
    return with_ids(benchmarks.load_gsm8k("test"), "gsm8k-test")


def custom_items(task: str, copy) -> list[dict]:
    """Rows of a user's copy of ``task`` (``eval.datasets.<task>``: a ``BenchmarkCopy`` or a
    path / hub id) with ids ``<task>-custom-<digest>-<i>``: the digest names the set by its
    content, so items of two different sets never pair (and the same set pairs however it was
    stored). Read once per process; errors (one line, naming the field) as ``load_copy``'s."""
    path, name, split = (copy, None, "test") if isinstance(copy, str) else (copy.path, copy.name, copy.split)
    rows, digest = _read_copy(task, path, name, split)
    return [{**r, "id": f"{task}-custom-{digest}-{i}"} for i, r in enumerate(rows)]


@functools.lru_cache(maxsize=8)
def _read_copy(task: str, path: str, name: str | None, split: str) -> tuple[list[dict], str]:
    from plora_ray.assets.copies import load_copy

    return load_copy(task, path, name, split)


def with_ids(rows: list[dict], prefix: str) -> list[dict]:
    """Rows with an ``id``: their own, else ``<prefix>-<position>`` (copies; input untouched)."""
    return [r if r.get("id") else {**r, "id": f"{prefix}-{i}"} for i, r in enumerate(rows)]


def default_fewshot(task: str) -> list[dict]:
    """Few-shot pools: MMLU dev (lm-eval's own); ARC validation and GSM8K's training part of
    the embedded mix split (lm-eval uses the train splits, which are not offline)."""
    from plora_ray.assets import benchmarks

    if task == "mmlu":
        return benchmarks.load_mmlu("dev")
    if task in ("arc_easy", "arc_challenge"):
        rows = benchmarks.load_arc(task.split("_")[1], "validation")
        return random.Random(1234).sample(rows, len(rows))
    rows = benchmarks.load_gsm8k("test")
    try:
        from plora_ray.assets.mix import gsm8k_split
    except ImportError:
        raise ValueError("gsm8k few-shot needs fewshot_items= (no offline GSM8K train split)") from None
    return [rows[i] for i in gsm8k_split()[0]]


def evaluate(model, tokenizer, tasks: list[str], limit: int | None = None, prompt_style: str = "chat",
             batch_size: int = 8, num_fewshot: int = 0, items: dict[str, list[dict]] | None = None,
             *, limit_mode: str = "first", seed: int = 1234, max_new_tokens: int = 256,
             fewshot_items: dict[str, list[dict]] | None = None,
             categories: dict[str, str] | None = None, heldout: list[dict] | None = None,
             rank: int = 0, world: int = 1, lockstep: bool = False, gsm8k_items: str = "test",
             datasets: dict | None = None, train: list[dict] | None = None) -> EvalResult:
    """Evaluate ``model`` on ``tasks`` (names in ``TASKS``); see the module docstring.

    Returns an :class:`EvalResult`: ``gsm8k/strict``, ``gsm8k/flexible``, ``mmlu/acc``,
    ``mmlu/{stem,humanities,social_sciences,other}`` (categories present), ``mmlu/subject/<s>``,
    ``arc_easy/acc``, ``arc_easy/acc_norm``, ``arc_challenge/acc``, ``arc_challenge/acc_norm``,
    each with its ``_stderr``, and ``<task>/n`` item counts. With ``heldout`` (tokenised
    examples, ``heldout.prepare_heldout``): ``heldout/loss``, ``heldout/loss_stderr``,
    ``heldout/n``, ``heldout/tokens``; with ``train`` (``heldout.prepare_train_eval``) the same
    four as ``train/...``. The model's train/eval mode is restored afterwards.

    ``world`` > 1: call on every rank of an initialised ``torch.distributed`` group with the
    same arguments; each scores its share and every rank returns the full result.
    ``datasets`` (``eval.datasets``): the user's copy of a task, read instead of the bundled one.
    ``lockstep=True`` under DeepSpeed ZeRO-3 (every rank joins every forward pass); pass the
    model itself (``engine.module``; for DDP the unwrapped module), not the training wrapper.
    """
    tasks = check_tasks(tasks, allow_empty=bool(heldout or train))
    shard = Shard(rank, world, lockstep)
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    if batch_size < 1 or num_fewshot < 0:
        raise ValueError("batch_size must be >= 1 and num_fewshot >= 0")
    items, fewshot_items = items or {}, fewshot_items or {}
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    samples: dict[str, list[dict]] = {}
    try:
        with dense_head(model):  # kv_prefix.dense_head: the head's fast matmul path
            for name, examples in (("heldout", heldout), ("train", train)):
                if examples:  # teacher-forced loss: held-out dialogues, training examples
                    metrics_h, samples[name] = evaluate_heldout(model, tokenizer, examples, batch_size,
                                                                shard, name)
                    metrics.update(metrics_h)
            for task in tasks:
                rows = with_ids(items[task] if task in items else default_items(task, gsm8k_items, datasets), task)
                # the problems the held-out loss scores (gsm8k-heldout-<i>) are not benchmark items too
                scored = {e.get("id") for e in heldout or ()}
                rows = [r for r in rows if r["id"] not in scored]
                n = limit.get(task, limit.get("*")) if isinstance(limit, dict) else limit
                rows = select(rows, n, limit_mode, seed, key="subject" if task == "mmlu" else None)
                shots = None
                if num_fewshot > 0:
                    shots = fewshot_items[task] if task in fewshot_items else default_fewshot(task)
                common = dict(prompt_style=prompt_style, batch_size=batch_size, num_fewshot=num_fewshot,
                              fewshot_items=shots, shard=shard)
                if task == "gsm8k":
                    m, recs = evaluate_gsm8k(model, tokenizer, rows, max_new_tokens=max_new_tokens, **common)
                elif task == "mmlu":
                    if categories is None:
                        from plora_ray.assets.benchmarks import MMLU_CATEGORIES as categories
                    m, recs = evaluate_mmlu(model, tokenizer, rows, categories=categories, **common)
                else:
                    m, recs = evaluate_arc(model, tokenizer, rows, task=task, **common)
                metrics.update(m)
                samples[task] = recs
    finally:
        model.train(was_training)
    return EvalResult(metrics, samples)


def evaluate_checkpoint(model, tokenizer, cfg, heldout: list[dict] | None = None, *, rank: int = 0,
                        world: int = 1, lockstep: bool = False, final: bool = False,
                        seed: int = 1234, train: list[dict] | None = None
                        ) -> tuple[dict[str, float], dict[str, dict]]:
    """A training checkpoint's evaluation: ``(metrics, items)``.

    ``cfg`` is the run's ``EvalConfig``; ``heldout`` the examples from
    ``heldout.prepare_heldout`` and ``train`` those from ``heldout.prepare_train_eval``
    (``eval.train_loss``), both scored at every checkpoint. Tasks in
    ``cfg.final_only_tasks`` run only when ``final``. ``metrics`` are ``eval/<task>/<metric>``
    and ``eval/<task>/<metric>_stderr`` floats for MLflow (left out: per-subject MMLU,
    counts, and the NaN standard errors of single-item groups); ``items`` is the ``tasks``
    part of ``items/step_*.json`` (``records.items_record``). Both are ``{}`` when there is
    nothing to evaluate. Call on every rank (see :func:`evaluate`); every rank gets the same
    result.

    ``cfg.harness`` (lm-evaluation-harness tasks by name, ``harness.harness_scores``) runs
    after the built-in tasks, at every checkpoint or (``at: last``) only when ``final``; every
    rank scores every item (in lockstep under ZeRO-3) and gets the same result.
    """
    tasks = [t for t in cfg.tasks if final or t not in cfg.final_only_tasks]
    metrics, items = {}, {}
    if tasks or heldout or train:
        limit = {"*": cfg.limit, **cfg.task_limits} if cfg.task_limits else cfg.limit
        res = evaluate(model, tokenizer, tasks, limit, cfg.prompt_style, cfg.batch_size, cfg.num_fewshot,
                       limit_mode=cfg.limit_mode, seed=seed, max_new_tokens=cfg.max_new_tokens,
                       heldout=heldout, rank=rank, world=world, lockstep=lockstep,
                       gsm8k_items=cfg.gsm8k_items, datasets=cfg.datasets, train=train)
        # a standard error over fewer than two items is NaN (lm-eval: N/A): left out of MLflow
        metrics = {f"eval/{k}": float(v) for k, v in res.items()
                   if "/subject/" not in k and not k.endswith(("/n", "/tokens"))
                   and not (k.endswith("_stderr") and math.isnan(v))}
        items = items_record(res)
    if cfg.harness.tasks and (final or cfg.harness.at == "every"):
        from plora_ray.evaluation.harness import harness_scores

        h_metrics, h_items = harness_scores(model, tokenizer, cfg.harness, rank=rank, world=world,
                                            lockstep=lockstep)
        clash = sorted(set(h_metrics) & set(metrics)) or sorted(set(h_items) & set(items))
        if clash:  # a harness group expanding into a task eval.tasks scores as well
            raise ValueError(f"eval.harness.tasks and eval.tasks both report {clash[0]}: keep the "
                             "task in one of them")
        metrics.update(h_metrics)
        items.update(h_items)
    return metrics, items
