"""A validated sweep in Ray Tune's terms: its param space, and how many trials it runs.

Ray is imported only where a param space is built: loading a sweep and ``--dry-run`` stay fast.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from plora_ray.config.io import flow
from plora_ray.config.schema import RunConfig
from plora_ray.config.spec import SweepSpec
from plora_ray.config.trials import TRIAL_INDEX, trial_run_config


def tune_param_space(spec: SweepSpec) -> dict[str, object]:
    """Flat ``{space key: Ray Tune domain}``; ``int`` is inclusive, so randint(lo, hi + 1)."""
    from ray import tune  # here, not at import: loading and validating a sweep stays fast

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "int": lambda v: tune.randint(v[0], v[1] + 1)}
    space = {key: make[d.kind](copy.deepcopy(d.values)) for key, d in spec.space.items()}
    if spec.repeats > 1 and spec.searcher.type != "optuna":  # optuna: tune.py's Repeater sets it
        space[TRIAL_INDEX] = tune.grid_search(list(range(spec.repeats)))
    return space


def trial_count(spec: SweepSpec) -> int:
    """Trials Ray Tune will run: num_samples (optuna) or num_samples x the grid's size, x repeats."""
    if spec.searcher.type == "optuna":
        return spec.num_samples * spec.repeats
    grid = math.prod(len(d.values) for d in spec.space.values() if d.kind == "grid")
    return spec.num_samples * grid * spec.repeats


def describe(spec: SweepSpec) -> str:
    """A few lines for ``--dry-run``: what will run, before anything does."""
    s, r, sch = spec.searcher, spec.resources, spec.scheduler
    sched = "none" if sch.type == "none" else (f"asha (grace {sch.grace_period}, reduction "
                                               f"{sch.reduction_factor:g}, max_t {sch.max_t or 'default'})")
    lines = [f"sweep {spec.name}: {trial_count(spec)} trials, {spec.max_concurrent} at a time; "
             f"{spec.mode} {spec.metric}",
             f"searcher {s.type} (seed {s.seed}), num_samples {spec.num_samples}, repeats "
             f"{spec.repeats}; scheduler {sched}",
             f"per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU, "
             f"placement {r.placement_strategy}; on failure: {spec.failures.worker_restarts} worker-group "
             f"restart(s), {spec.failures.trial_retries} trial retry(ies)"]
    for key, d in spec.space.items():
        if "," in key:  # a joint key: one table row per line
            lines += [f"  {key}: {d.kind}"] + [f"    {flow(v)}" for v in d.values]
        else:
            lines.append(f"  {key}: {d.kind} {flow(d.values)}")
    lines += [f"  {key} = {flow(v)}" for key, v in spec.fixed.items()]
    cfg = trial_run_config(spec, {key: d.values[0] for key, d in spec.space.items()})
    return "\n".join(lines + [f"trains on (first trial): {describe_data(cfg)}",
                              f"checkpoints (first trial): {describe_checkpoints(cfg)}",
                              f"scored at checkpoints (first trial): {describe_eval(cfg)}"])


def describe_checkpoints(cfg: RunConfig) -> str:
    """When a run checkpoints (and scores): every ``checkpoint_every_steps`` and at the last step;
    the steps themselves when ``data.max_steps`` bounds the run's length. The data's own length
    is known only once it is read and tokenised (after this description): a run whose epochs end
    before ``max_steps`` stops there, with its last checkpoint, and the line says so."""
    every, last = cfg.checkpoint_every_steps, cfg.data.max_steps
    if last is None:
        return f"every {every} steps and at the end" if every else "at the end"
    steps = sorted({*range(every, last + 1, every), last} if every else {last})
    shown = ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    epochs = f"{cfg.data.epochs} epoch{'s' if cfg.data.epochs > 1 else ''}"
    return (f"{len(steps)}, at steps {shown} of {last} (data.max_steps; should {epochs} of the data end "
            "sooner, the run stops there with its last checkpoint)")


def describe_data(cfg: RunConfig) -> str:
    """The training sources, each with what narrows or maps it, and the chat template."""
    parts = []
    for src in cfg.data.all_sources():
        bits = [f"name {src.name}" if src.name else "", f"split {src.split}" if src.split != "train" else "",
                f"data_files {flow(src.data_files)}" if src.data_files else "",
                "where " + flow(src.where) if src.where else "",
                "columns " + ", ".join(f"{v}->{k}" for k, v in src.columns.items()) if src.columns else "",
                f"first {src.max_rows} rows" if src.max_rows else ""]
        bits = [b for b in bits if b]
        parts.append(src.path + (f" ({'; '.join(bits)})" if bits else ""))
    t = cfg.model.chat_template
    template = "the tokenizer's own" if t is None else (t if len(t) < 40 else "a Jinja template")
    return f"{' + '.join(parts)}; chat template {template}; max_length {cfg.data.max_length}"


GSM8K_SETS = {"test": "GSM8K's test set, 1,319 problems", "heldout": "the 319 GSM8K problems the embedded mix never trains on"}


def describe_copy(task: str, copy) -> str:
    """A user's copy of ``task`` (``eval.datasets``): where, how many items, the set's digest
    (its items' ids are ``<task>-custom-<digest>-<i>``)."""
    from plora_ray.assets.copies import load_copy

    rows, digest = load_copy(task, copy.path, copy.name, copy.split)
    where = [f"name {copy.name}" if copy.name else "",
             "" if Path(copy.path).is_file() else f"split {copy.split}"]
    return (f"your copy {copy.path}" + "".join(f", {w}" for w in where if w)
            + f", {len(rows):,} items, set custom-{digest}")


def describe_eval(cfg: RunConfig) -> str:
    """What a run scores at its checkpoints, and on which items."""
    e, parts = cfg.eval, []
    h = e.heldout
    if h.files or h.fraction or (h.files is None and cfg.data.embedded()):
        parts.append("held-out loss")
    t = e.train_loss
    if t is not None:
        which = "all training examples" if t.limit is None else f"{t.limit} training examples, seed {t.seed}"
        parts.append(f"training-set loss ({which})")
    for task in e.tasks:
        n = e.task_limits.get(task, e.limit)
        items = "all items" if n is None else f"{'the first' if e.limit_mode == 'first' else 'a sample of'} {n}"
        what = describe_copy(task, e.datasets[task]) if task in e.datasets else \
            GSM8K_SETS[e.gsm8k_items] if task == "gsm8k" else "test set"
        if task == "gsm8k" and e.gsm8k_items == "heldout" and "held-out loss" in parts:
            items += " not in the held-out loss"
        when = ", last checkpoint only" if task in e.final_only_tasks else ""
        parts.append(f"{task} ({what}: {items}{when})")
    hz = e.harness
    for task in hz.tasks:
        items = "all items" if hz.limit is None else f"the first {hz.limit}"
        when = ", last checkpoint only" if hz.at == "last" else ""
        parts.append(f"{task} (lm-eval: {items}{when})")
    return "; ".join(parts) or "nothing (train/loss only)"
