"""Evaluate a model or a training run on GSM8K / MMLU / ARC (lm-evaluation-harness definitions).

    python -m plora_ray.evaluate MODEL_OR_CHECKPOINT --tasks gsm8k,mmlu,arc_easy,arc_challenge \\
        --limit 20 [--prompt-style chat|plain] [--batch-size 8] [--output results.json]
    python -m plora_ray.evaluate MODEL --tasks gsm8k --dataset gsm8k=data/gsm8k_test.jsonl \\
        --dataset 'arc_easy={path: allenai/ai2_arc, name: ARC-Easy}'   # your own copies
    python -m plora_ray.evaluate MODEL --tasks '' --harness hellaswag,my_task --include-path tasks/

MODEL_OR_CHECKPOINT: ``tiny`` (random-init test model), an embedded asset name such as
``smollm2-135m-instruct``, a model directory or hub id transformers can load, the output
directory of ``python -m plora_ray.train`` (one process or Ray: its ``merged/`` model, else its
checkpoint), or a checkpoint directory (e.g. the best checkpoint a sweep prints). Prints a table; ``--output`` writes metrics
and per-item records as JSON. ``--dataset TASK=COPY`` scores your own copy of a task, as a run
config's ``eval.datasets`` does (a file, a save_to_disk or dataset folder, a hub id, or a YAML
mapping ``{path, name, split}``; item ids ``<task>-custom-<digest>-<i>``). ``--harness`` scores
any lm-evaluation-harness task by name with lm-eval itself, as a run config's ``eval.harness``
does (``--include-path``: a folder of your own task YAMLs; ``--limit`` applies). Bad input: one
``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plora_ray.config.names import TASKS  # no torch import


class UsageError(Exception):
    """Bad command-line input; the message is the one line shown to the user."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plora_ray.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="items per task (MMLU: per subject)")
    p.add_argument("--limit-mode", choices=("first", "sample"), default="first")
    p.add_argument("--seed", type=int, default=1234, help="seed of --limit-mode sample")
    p.add_argument("--prompt-style", choices=("chat", "plain"), default="chat")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation budget")
    p.add_argument("--gsm8k-items", choices=("test", "heldout"), default=None,
                   help="GSM8K's whole test set (1,319, the default), or the 319 problems the embedded mix "
                   "never trains on")
    p.add_argument("--dataset", action="append", default=[], metavar="TASK=COPY",
                   help="your own copy of a task instead of the bundled one: a json/jsonl/parquet file, a "
                   "save_to_disk or dataset folder, a hub id, or '{path: ID, name: CONFIG, split: SPLIT}'")
    p.add_argument("--harness", default="", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness task, group or tag names, scored by lm-eval")
    p.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: a run's own model.dtype, else float32)")
    p.add_argument("--output", help="write metrics and per-item records to this JSON file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate everything that needs no model, before the slow imports."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    args.harness_tasks = list(dict.fromkeys(t.strip() for t in args.harness.split(",") if t.strip()))
    if bad or not (tasks or args.harness_tasks):
        what = f"unknown task {bad[0]!r}" if bad else "--tasks is empty (and no --harness task)"
        raise UsageError(f"{what}; choose from {','.join(TASKS)}, or name lm-eval tasks with --harness")
    both = set(tasks) & set(args.harness_tasks)
    if both:
        raise UsageError(f"{sorted(both)[0]} is in --tasks and --harness (both report eval/<task>/...): keep one")
    if args.include_path is not None and not Path(args.include_path).expanduser().is_dir():
        raise UsageError(f"--include-path {args.include_path} is not a folder: give the folder of your task YAMLs")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1 or args.num_fewshot < 0 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1, --num-fewshot >= 0")
    name = args.model
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # not a hub id
    if looks_like_path and not Path(name).expanduser().exists():
        raise UsageError(f"model path not found: {name}")
    if args.output and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise UsageError(f"--output directory does not exist: {Path(args.output).parent}")
    args.copies = parse_datasets(args.dataset, tasks)
    if "gsm8k" in args.copies and args.gsm8k_items:
        raise UsageError(f"--gsm8k-items {args.gsm8k_items} picks the bundled GSM8K, but --dataset gsm8k gives "
                         "your own copy: drop one of them")
    args.gsm8k_items = "custom" if "gsm8k" in args.copies else args.gsm8k_items or "test"
    return list(dict.fromkeys(tasks))


def parse_datasets(values: list[str], tasks: list[str]) -> dict:
    """``--dataset TASK=COPY`` values -> ``{task: BenchmarkCopy}`` (validated as ``eval.datasets``)."""
    import yaml
    from pydantic import ValidationError

    from plora_ray.config.evaluation import BenchmarkCopy

    copies = {}
    for value in values:
        task, sep, raw = value.partition("=")
        task = task.strip()
        if not sep or not raw.strip():
            raise UsageError(f"--dataset {value!r}: give TASK=COPY, e.g. --dataset gsm8k=data/gsm8k_test.jsonl")
        if task not in tasks:
            raise UsageError(f"--dataset {task}: {task} is not in --tasks ({','.join(tasks)}): add it or drop "
                             "the --dataset")
        if task in copies:
            raise UsageError(f"--dataset {task} is given twice: keep one")
        try:
            parsed = yaml.safe_load(raw) if raw.lstrip().startswith("{") else raw.strip()
            copies[task] = BenchmarkCopy.model_validate(parsed)
        except (yaml.YAMLError, ValidationError) as exc:
            why = exc.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(exc, ValidationError) \
                else "not a YAML mapping"
            raise UsageError(f"--dataset {task}: {why}") from None
    return copies


def harness_config(args: argparse.Namespace):
    """The ``--harness`` tasks as an ``eval.harness`` config, names checked (ValueError), or None."""
    if not args.harness_tasks:
        return None
    from plora_ray.config.evaluation import HarnessConfig
    from plora_ray.evaluation.harness import check_harness_tasks

    cfg = HarnessConfig(tasks=args.harness_tasks, include_path=args.include_path, limit=args.limit,
                        num_fewshot=args.num_fewshot or None, batch_size=args.batch_size)
    check_harness_tasks(cfg.tasks, cfg.include_path)
    return cfg


def merge_harness(result, metrics: dict, items: dict):
    """The built-in tasks' result (or an empty one) with lm-eval's metrics and per-item records."""
    from plora_ray.evaluation.run import EvalResult

    merged = EvalResult({**(result or {}), **metrics}, dict(result.samples) if result is not None else {})
    merged.samples.update({f"harness/{task}": rec for task, rec in items.items()})
    return merged


def format_table(metrics: dict[str, float]) -> str:
    """Main metrics, one per line (per-subject MMLU scores are in the JSON output)."""
    rows = [(k, v) for k, v in metrics.items() if "/subject/" not in k]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:d}" if isinstance(v, int) else f"{k:<{width}}  {v:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = check_args(args)
        from plora_ray.config.schema import ConfigError
        from plora_ray.evaluation import evaluate
        from plora_ray.evaluation.run import custom_items
        from plora_ray.run.rundir import load_model

        errors: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError)
        try:
            from plora_ray.assets.fetch import AssetError

            errors += (AssetError,)
        except ImportError:
            pass
        try:
            for task, copy in args.copies.items():  # read before the model loads (fails fast)
                custom_items(task, copy)
            harness = harness_config(args)  # names checked against lm-eval's registry
            model, tokenizer = load_model(args.model, args.dtype)
            result = evaluate(model, tokenizer, tasks, args.limit, prompt_style=args.prompt_style,
                              batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                              limit_mode=args.limit_mode, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, gsm8k_items=args.gsm8k_items,
                              datasets=args.copies) if tasks else None
            if harness is not None:
                from plora_ray.evaluation.harness import harness_scores

                metrics, items = harness_scores(model, tokenizer, harness)
                result = merge_harness(result, metrics, items)
        except errors as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(message.replace("eval.datasets.", "--dataset ", 1)) from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.output:
        payload = {"model": args.model, "tasks": tasks, "limit": args.limit, "limit_mode": args.limit_mode,
                   "prompt_style": args.prompt_style, "num_fewshot": args.num_fewshot,
                   "gsm8k_items": args.gsm8k_items if "gsm8k" in tasks else None,
                   "datasets": {t: c.model_dump() for t, c in args.copies.items()}, **result.to_json()}
        Path(args.output).expanduser().write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
