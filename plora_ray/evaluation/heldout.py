"""Held-out loss: teacher-forced loss over the assistant tokens of dialogues never trained on.

Why: benchmark accuracy on a few hundred items moves in coarse steps; the loss on held-out
dialogues of the training distribution is smooth, cheap (forward passes only) and can be
measured at every checkpoint.

Examples are tokenised exactly as training tokenises them (``plora_ray.run.data``: chat template,
loss on assistant tokens only, ``data.max_length``). For example i with labelled positions
L_i, ``loss_i = mean over p in L_i of -log p(x_p | x_<p)`` and ``tokens_i = |L_i|``. The task
metric ``heldout/loss`` is the token-weighted mean ``sum_i loss_i * tokens_i / sum_i
tokens_i`` (the training loss's definition); ``heldout/loss_stderr`` is lm-eval's
``mean_stderr`` over the per-example ``loss_i`` (docs/tracking_layout.md).

Sources (``eval.heldout``): dialogue files or bundled names, ``gsm8k-heldout`` (the 319 GSM8K
problems the embedded mix keeps out: question -> reference solution, calculator annotations
removed, as the mix formats GSM8K), and a seeded fraction of the training examples
(:func:`split_heldout`, which the training loop must apply before it plans its steps).

The training-set loss (``eval.train_loss``, ``train/loss`` here, ``eval/train/loss`` in MLflow)
is the same measure on a fixed seeded subset of the examples the run trains on
(:func:`prepare_train_eval`): how much of its training set a run has absorbed.
"""

from __future__ import annotations

import random
import re

import torch
import torch.nn.functional as F

from plora_ray.evaluation.kv_prefix import cache_argument, forward_logits, head_on, selected_logits
from plora_ray.evaluation.sharding import LOCAL, Shard
from analysis.stats import stderr

__all__ = ["gsm8k_heldout_rows", "heldout_indices", "heldout_losses", "heldout_metrics", "load_heldout",
           "prepare_heldout", "prepare_train_eval", "split_heldout"]

_CALC = re.compile(r"<<[^<>]*>>")
ROW_CHUNK_BYTES = 4 * 2**20  # fp32 logits per chunk of the held-out cross-entropy


def heldout_indices(n: int, fraction: float, seed: int = 0) -> list[int]:
    """Positions of the ``round(fraction * n)`` examples :func:`split_heldout` keeps out, sorted."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eval.heldout.fraction must be in [0, 1), got {fraction}")
    n_out = round(fraction * n)
    if n_out and n_out >= n:
        raise ValueError(f"eval.heldout.fraction {fraction} leaves no training example of "
                         f"{n}: lower it")
    return sorted(random.Random(seed).sample(range(n), n_out)) if n_out else []


def split_heldout(examples: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, heldout): ``round(fraction * n)`` examples drawn with ``random.Random(seed)``
    kept out; both keep source order. Held-out dict examples are copied with ``id`` set to
    ``train-<index in examples>`` (stable across runs on the same files and seed)."""
    out = heldout_indices(len(examples), fraction, seed)
    if not out:
        return examples, []
    drop = set(out)
    kept = [i for i in range(len(examples)) if i not in drop]
    train = examples.select(kept) if hasattr(examples, "select") else [examples[i] for i in kept]
    held = [({"id": f"train-{i}", **e} if isinstance(e, dict) else e)
            for i in out for e in [examples[i]]]
    return train, held


def prepare_train_eval(run_cfg, examples) -> list[dict]:
    """The training examples ``eval.train_loss`` scores (``[]`` when it is off): ``limit`` of
    those the run trains on (``examples`` less the ``eval.heldout.fraction`` split, as
    :func:`prepare_heldout` takes it) drawn with ``random.Random(seed)``, in source order, with
    ``id`` ``train-<index in examples>``. The draw depends on the data and ``eval`` only, so every
    trial and run seed of a sweep scores the same examples (their ids pair across runs)."""
    t = run_cfg.eval.train_loss
    if t is None:
        return []
    h = run_cfg.eval.heldout
    drop = set(heldout_indices(len(examples), h.fraction, h.seed))
    pool = [i for i in range(len(examples)) if i not in drop]
    if t.limit is not None and t.limit < len(pool):
        pool = sorted(random.Random(t.seed).sample(pool, t.limit))
    return [{"id": f"train-{i}", **examples[i]} for i in pool]


def gsm8k_heldout_rows() -> list[tuple[str, dict]]:
    """(id, dialogue row) for the embedded mix's 319 held-out GSM8K problems."""
    from plora_ray.assets.mix import gsm8k_heldout

    return [(f"gsm8k-heldout-{i}", {"messages": [
        {"role": "user", "content": r["question"]},
        {"role": "assistant", "content": _CALC.sub("", r["answer"]).strip()}]})
        for i, r in enumerate(gsm8k_heldout())]


def _rows(name: str) -> list[tuple[str, object]]:
    from plora_ray.assets.dialogues import named_rows, read_rows

    if name == "gsm8k-heldout":
        return gsm8k_heldout_rows()
    rows = named_rows(name)
    return rows if rows is not None else [(f"{name}:{n}", row) for n, row in read_rows(name)]


def load_heldout(files: list[str], tokenizer, max_length: int) -> list[dict]:
    """Tokenised held-out examples ``{id, input_ids, labels}`` from ``files`` (examples without
    an assistant token inside ``max_length`` are skipped, as training skips them)."""
    from plora_ray.config.names import IGNORE
    from plora_ray.assets.dialogues import to_messages, tokenize_dialogue

    out = []
    for f in files:
        for where, row in _rows(f):
            ex = tokenize_dialogue(tokenizer, to_messages(row, where), max_length)
            if any(label != IGNORE for label in ex["labels"][1:]):
                out.append({"id": where, **ex})
    return out


def prepare_heldout(run_cfg, tokenizer, train_examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples) for a run: the configured files (default: the
    GSM8K held-out problems when training on an embedded mix) plus the seeded fraction of
    ``train_examples``; ``eval.heldout.limit`` keeps the first N. Call once, before planning
    the training steps, and train on the first element."""
    h = run_cfg.eval.heldout
    files = h.files
    if files is None:
        files = ["gsm8k-heldout"] if run_cfg.data.embedded() else []
    train, held = split_heldout(train_examples, h.fraction, h.seed)
    held = load_heldout(files, tokenizer, run_cfg.data.max_length) + held
    return train, held[:h.limit] if h.limit is not None else held


@torch.inference_mode()
def heldout_losses(model, tokenizer, examples: list[dict], batch_size: int = 8,
                   shard: Shard = LOCAL) -> list[tuple[float, int]]:
    """(mean token loss, labelled token count) per example of this rank's ``examples``.

    Batches group similar lengths (longest first), right-padded: the model is causal, so
    padding after a sequence never reaches its scored positions. The tokens a batch's rows
    begin with in common (a chat template's system prompt: 24 of SmolLM2's ~186) run once, the
    rows on copies of their KV cache, when the model takes a cache (the same losses to fp32
    rounding). Under a lockstep ``shard`` the forward calls are padded to the largest count
    over ranks, and every batch is one forward.
    """
    from plora_ray.config.names import IGNORE

    from plora_ray.evaluation.multiple_choice import dummy_forward

    device = next(model.parameters()).device
    arg = None if shard.lockstep and shard.distributed else cache_argument(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    out: list[tuple[float, int]] = [(float("nan"), 0)] * len(examples)
    n_batches = -(-len(order) // batch_size)
    for b in range(shard.agree_count(n_batches, device)):
        if b >= n_batches:
            dummy_forward(model, tokenizer, device)
            continue
        idx = order[b * batch_size:(b + 1) * batch_size]
        width = len(examples[idx[0]]["input_ids"])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(examples[i]["input_ids"])
            ids[row, :n] = torch.tensor(examples[i]["input_ids"])
            labels[row, :n] = torch.tensor(examples[i]["labels"])
        target = labels[:, 1:]  # position p predicts token p + 1
        scored = (target != IGNORE).any(0).nonzero().flatten()
        lo = int(scored[0]) if len(scored) else 0
        keep = torch.arange(lo, width - 1)  # logits only where some row is scored: saves memory
        tgt = target[:, lo:]
        mask = tgt != IGNORE
        # the vocabulary projection only where a row is scored (not on its prompt or padding)
        with head_on(model, mask.to(device)):
            logits = forward_logits(model, ids.to(device), keep.to(device),
                                    [examples[i]["input_ids"] for i in idx], arg)
        nll = _row_losses(selected_logits(logits, mask.to(device)), tgt[mask])
        rows = mask.nonzero()[:, 0]
        for row, i in enumerate(idx):
            count = int(mask[row].sum())
            total = float(nll[rows == row].sum())
            out[i] = (total / count if count else float("nan"), count)
    return out


def _row_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, reduction="none")`` on the host, bitwise: the
    loss is per row, so it runs over chunks of rows of contiguous ``(tokens, vocab)`` logits (the
    ``(B, V, T)`` transposed form is ~10x slower on CPU), each cast to fp32 on its own: no fp32
    copy of all logits (200 MB for 1000 SmolLM2 tokens, ~2-5x the time of the chunks on CPU)."""
    chunk = max(1, ROW_CHUNK_BYTES // (4 * logits.size(-1)))
    return torch.cat([F.cross_entropy(logits[s: s + chunk].float().cpu(), targets[s: s + chunk], reduction="none")
                      for s in range(0, logits.size(0), chunk)]) if logits.size(0) else logits.new_zeros(0).float().cpu()


def heldout_metrics(records: list[dict], name: str = "heldout") -> dict[str, float]:
    """``<name>/loss`` (token-weighted), ``<name>/loss_stderr`` (over examples),
    ``<name>/n``, ``<name>/tokens`` from per-example ``{loss, tokens}`` records."""
    tokens = sum(r["tokens"] for r in records)
    loss = sum(r["loss"] * r["tokens"] for r in records) / tokens if tokens else float("nan")
    return {f"{name}/loss": loss, f"{name}/loss_stderr": stderr(r["loss"] for r in records),
            f"{name}/n": len(records), f"{name}/tokens": tokens}


def evaluate_heldout(model, tokenizer, examples: list[dict], batch_size: int = 8,
                     shard: Shard = LOCAL, name: str = "heldout") -> tuple[dict, list[dict]]:
    """(metrics, per-example records ``{id, loss, tokens}`` in ``examples`` order); ``name``
    prefixes the metrics (``train``: the training-set examples of :func:`prepare_train_eval`)."""
    local = shard.take(examples)
    scored = heldout_losses(model, tokenizer, local, batch_size, shard)
    records = [{"id": e.get("id"), "loss": loss, "tokens": n} for e, (loss, n) in zip(local, scored)]
    records = shard.gather(records, len(examples))
    return heldout_metrics(records, name), records
