"""Forward passes that run the tokens a batch's rows begin with in common once.

Chat-templated evaluation prompts all begin with the template's system prompt (24 tokens of
SmolLM2's ~186 for a held-out GSM8K dialogue); an MMLU batch also shares its instruction.
:func:`forward_logits` runs that common prefix once (one row), then every row's rest on copies
of its KV cache: the logits of one full forward per batch, to fp32 rounding, for fewer FLOPs.
Models that take no cache (or positions inside the prefix that must be scored) get the plain
forward. A rank under ZeRO-3 lockstep must pass ``arg=None``: the cached path is two forward
calls, and every rank has to make the same number.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

MIN_SHARED_PREFIX = 8  # fewer common tokens than this: one plain forward


def cache_argument(model) -> str | None:
    """The name under which ``model``'s forward (or that of the model inside a peft wrapper)
    takes a KV cache: ``cache`` (transformers 5) or ``past_key_values`` (4.x); None for an
    encoder-decoder or a model without one."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def shared_prefix(rows: list[list[int]], limit: int) -> int:
    """How many leading tokens all ``rows`` share, at most ``limit`` (the first position whose
    logits are needed) and leaving each row at least one token."""
    n = max(min(limit, min(len(r) for r in rows) - 1), 0)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def logits_on_prefix(model, arg: str, ids: torch.Tensor, shared: int, keep: torch.Tensor) -> torch.Tensor:
    """Logits at positions ``keep`` of ``ids[:, shared:]`` for rows that begin with the same
    ``shared`` tokens: those run once, the rest of every row on copies of their KV cache."""
    # no position of the prefix is scored: the head runs on none (an empty index, not 0 = all)
    none = torch.empty(0, dtype=torch.long, device=ids.device)
    cache = model(input_ids=ids[:1, :shared], use_cache=True, logits_to_keep=none)[arg]
    cache.batch_repeat_interleave(ids.shape[0])
    return model(input_ids=ids[:, shared:], use_cache=True, logits_to_keep=keep, **{arg: cache}).logits


def forward_logits(model, ids: torch.Tensor, keep: torch.Tensor, rows: list[list[int]] | None = None,
                   arg: str | None = None) -> torch.Tensor:
    """Logits of right-padded ``ids`` at sequence positions ``keep`` (ascending, contiguous).

    With ``arg`` (:func:`cache_argument`) and the unpadded ``rows``, a prefix of at least
    :data:`MIN_SHARED_PREFIX` tokens that every row shares before ``keep[0]`` runs once
    (:func:`logits_on_prefix`). Otherwise one forward with ``logits_to_keep`` where the model
    takes it (full logits indexed afterwards where not: the same numbers)."""
    shared = shared_prefix(rows, int(keep[0])) if arg and rows else 0
    if shared >= MIN_SHARED_PREFIX:
        return logits_on_prefix(model, arg, ids, shared, keep - shared)
    try:
        logits = model(input_ids=ids, logits_to_keep=keep).logits
        if logits.shape[1] == ids.shape[1] != keep.numel():  # a model that ignores logits_to_keep
            logits = logits[:, keep]
    except TypeError:
        logits = model(input_ids=ids).logits[:, keep]
    return logits


def _output_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


@contextmanager
def _head_input(model, hook):
    """While open, ``hook`` (a forward pre-hook) rewrites the input of ``model``'s output head;
    a model without one: nothing changes."""
    head = _output_head(model)
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def dense_head(model):
    """While open, ``model``'s output head gets its input with standard (row-major) strides.

    Why: ``logits_to_keep=1`` (``generate``'s prefill, a context's last position) slices the
    hidden states to ``(B, 1, H)`` with the row stride of the full sequence; PyTorch (2.13, CPU)
    then runs the vocabulary projection as a batched matmul on a B-fold copy of the head's
    weight: 90 ms instead of 6 ms for one SmolLM2 row, 1.9 s of a 4-row GSM8K prefill. A copy of
    the few kept rows gives the same logits through the plain matmul, to float rounding."""
    def densify(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and hidden.stride() != _row_major(hidden.shape):
            return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
        return None

    with _head_input(model, densify):
        yield


def _row_major(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


@contextmanager
def head_on(model, select: torch.Tensor):
    """While open, ``model``'s output head (the vocabulary projection) runs only on the
    positions ``select`` marks: a bool ``(rows, kept positions)`` mask of the positions a
    forward keeps logits for (``logits_to_keep``). Such a forward then returns logits of shape
    ``(1, select.sum(), vocab)``, the marked positions in row-major order; a forward whose
    hidden states have another shape (a cache prefix, a model without ``logits_to_keep``) is
    left as it is. What a model does to its logits after the head (scaling, soft-capping) is
    elementwise, so it is unchanged. A model without an output head: nothing changes."""
    def gather(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(select.shape):
            return (hidden[select].unsqueeze(0), *args[1:])
        return None

    with _head_input(model, gather):
        yield


def selected_logits(logits: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """The ``(select.sum(), vocab)`` logits of the marked positions from a forward run under
    :func:`head_on` (gathered already) or not (``(rows, kept positions, vocab)``)."""
    if tuple(logits.shape[:2]) == tuple(select.shape):
        return logits[select]
    return logits[0]
