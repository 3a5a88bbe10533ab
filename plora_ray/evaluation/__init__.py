"""Benchmark evaluators (GSM8K, MMLU, ARC-Easy/Challenge) defined as lm-evaluation-harness
0.4.13 defines them, runnable on an in-memory model and sharded over the ranks of a
distributed run, plus the held-out loss (standard errors: :mod:`analysis.stats`). Entry points:
:func:`evaluate`; in a training run :func:`evaluate_checkpoint` (metrics for MLflow and
per-item results)."""

from plora_ray.evaluation.gsm8k import evaluate_gsm8k, exact_match, extract_flexible, extract_strict, generate_until
from plora_ray.evaluation.heldout import evaluate_heldout, heldout_losses, load_heldout, prepare_heldout, split_heldout
from plora_ray.evaluation.multiple_choice import evaluate_arc, evaluate_mmlu, loglikelihoods, score_choices
from plora_ray.evaluation.records import items_record
from plora_ray.evaluation.run import TASKS, EvalResult, evaluate, evaluate_checkpoint, select
from plora_ray.evaluation.sharding import Shard

__all__ = [
    "TASKS",
    "EvalResult",
    "Shard",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_heldout",
    "evaluate_arc",
    "evaluate_gsm8k",
    "evaluate_mmlu",
    "exact_match",
    "extract_flexible",
    "extract_strict",
    "generate_until",
    "heldout_losses",
    "items_record",
    "load_heldout",
    "loglikelihoods",
    "prepare_heldout",
    "score_choices",
    "select",
    "split_heldout",
]
