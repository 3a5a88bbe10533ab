"""Evaluate a model or a training run on GSM8K / MMLU / ARC (lm-evaluation-harness definitions).

    python -m plora_ray.evaluate MODEL_OR_CHECKPOINT --tasks gsm8k,mmlu,arc_easy,arc_challenge \\
        --limit 20 [--prompt-style chat|plain] [--batch-size 8] [--output results.json]

MODEL_OR_CHECKPOINT: ``tiny`` (random-init test model), an embedded asset name such as
``smollm2-135m-instruct``, a model directory or hub id transformers can load, the output
directory of ``python -m plora_ray.train`` (one process or Ray: its ``merged/`` model, else its
checkpoint), or a checkpoint directory (e.g. the best checkpoint a sweep prints). Prints a table; ``--output`` writes metrics
and per-item records as JSON. Bad input: one ``error:`` line on stderr and exit status 2.
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
    p.add_argument("--gsm8k-items", choices=("test", "heldout"), default="test",
                   help="GSM8K's whole test set (1,319), or the 319 problems the embedded mix never trains on")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: a run's own model.dtype, else float32)")
    p.add_argument("--output", help="write metrics and per-item records to this JSON file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate everything that needs no model, before the slow imports."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        what = f"unknown task {bad[0]!r}" if bad else "--tasks is empty"
        raise UsageError(f"{what}; choose from {','.join(TASKS)}")
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
    return list(dict.fromkeys(tasks))


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
        from plora_ray.run.rundir import load_model

        errors: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError)
        try:
            from plora_ray.assets.fetch import AssetError

            errors += (AssetError,)
        except ImportError:
            pass
        try:
            model, tokenizer = load_model(args.model, args.dtype)
            result = evaluate(model, tokenizer, tasks, args.limit, prompt_style=args.prompt_style,
                              batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                              limit_mode=args.limit_mode, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, gsm8k_items=args.gsm8k_items)
        except errors as exc:
            raise UsageError(" ".join(str(exc).split()) or type(exc).__name__) from None
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.output:
        payload = {"model": args.model, "tasks": tasks, "limit": args.limit, "limit_mode": args.limit_mode,
                   "prompt_style": args.prompt_style, "num_fewshot": args.num_fewshot, **result.to_json()}
        Path(args.output).expanduser().write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
