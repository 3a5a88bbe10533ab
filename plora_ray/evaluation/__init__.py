"""Benchmark evaluators (GSM8K, MMLU, ARC-Easy/Challenge) defined as lm-evaluation-harness
0.4.13 defines them, runnable on an in-memory model. Entry point: :func:`evaluate`."""

from .gsm8k import evaluate_gsm8k, exact_match, extract_flexible, extract_strict, generate_until
from .multiple_choice import evaluate_arc, evaluate_mmlu, loglikelihoods, score_choices
from .run import TASKS, EvalResult, evaluate, select

__all__ = [
    "TASKS",
    "EvalResult",
    "evaluate",
    "evaluate_arc",
    "evaluate_gsm8k",
    "evaluate_mmlu",
    "exact_match",
    "extract_flexible",
    "extract_strict",
    "generate_until",
    "loglikelihoods",
    "score_choices",
    "select",
]
