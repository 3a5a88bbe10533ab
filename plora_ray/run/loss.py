"""The training loss: next-token cross-entropy summed over the labelled tokens, computed
without materialising full-vocabulary fp32 logits.

Two savings, both exact (the same per-token losses as ``F.cross_entropy`` over the full
logits, up to fp32 rounding):

* only the positions whose next token is labelled are projected onto the vocabulary: the
  model receives them as ``logits_to_keep`` (transformers slices the hidden states before
  ``lm_head``), so prompt and padding positions cost no ``lm_head`` matmul forward or
  backward. The positions are computed on the host, so no device synchronisation is needed;
* the cross-entropy runs over row chunks (:class:`ChunkedCrossEntropy`): each chunk is cast
  to fp32, reduced to its log-sum-exp, and the softmax is recomputed chunk by chunk in the
  backward pass, written into the gradient in the logits' dtype; no fp32 copy of all logits
  (nor of their log-softmax) is kept.
"""

from __future__ import annotations

import inspect

import torch

from plora_ray.config.names import IGNORE

CHUNK_BYTES = 32 * 2**20  # fp32 bytes of one chunk of logits


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``logsumexp(x) - x[label]`` for ``logits`` (N, V), ``labels`` (N,)
    with ``IGNORE`` rows skipped; forward and backward in fp32, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels != IGNORE
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.size(0), chunk):
            x = logits[s: s + chunk].float()
            lse[s: s + chunk] = torch.logsumexp(x, dim=-1)
            target = x.gather(1, safe[s: s + chunk, None]).squeeze(1)
            total += torch.where(valid[s: s + chunk], lse[s: s + chunk] - target, 0.0).sum()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = valid.float() * grad_out.float()
        for s in range(0, logits.size(0), ctx.chunk):
            rows = slice(s, s + ctx.chunk)
            p = torch.exp(logits[rows].float() - lse[rows, None])
            p.scatter_add_(1, safe[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad[rows] = p * scale[rows, None]
        return grad, None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` (..., V) against ``labels`` (...), ``IGNORE`` skipped."""
    logits = logits.reshape(-1, logits.size(-1))
    chunk = chunk or max(1, CHUNK_BYTES // (4 * logits.size(-1)))
    return ChunkedCrossEntropy.apply(logits, labels.reshape(-1), chunk)


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where logits are needed and what they predict, for (B, T) ``labels``.

    Returns ``positions`` (B, K) and ``targets`` (B, K), K the most labelled next tokens of
    any row: row b's logits at ``positions[b, j]`` predict ``targets[b, j]``; rows with fewer
    labels repeat position 0 with target ``IGNORE``. Meant for host tensors (no sync).
    """
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    keep = nxt != IGNORE
    k = max(int(keep.sum(1).max()) if keep.numel() else 0, 1)
    # stable sort puts the labelled positions first, in order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    kept = torch.gather(keep, 1, order)
    positions = torch.where(kept, order, 0)
    targets = torch.where(kept, torch.gather(nxt, 1, order), IGNORE)
    return positions, targets


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM inside ``model`` (DDP / DeepSpeed / peft wrappers) takes
    ``logits_to_keep`` in its forward."""
    model = getattr(model, "module", model)  # DDP, DeepSpeed
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(batch: dict) -> dict:
    """What the model is given of ``batch``: ``input_ids`` and ``attention_mask`` (padded) or
    ``position_ids`` (packed: :func:`plora_ray.run.data.pack`); no KV cache (a cache would
    also turn off transformers' packed-sequence attention)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch} | \
        {"use_cache": False}


def loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled tokens of ``batch``.

    ``batch`` holds ``input_ids``, ``attention_mask`` or ``position_ids``, and either
    ``positions`` and ``targets`` (:func:`loss_positions`, computed on the host: no device
    sync) or ``labels``.
    """
    if "positions" in batch:
        positions, targets = batch["positions"], batch["targets"]
    else:
        device = batch["labels"].device
        positions, targets = (t.to(device) for t in loss_positions(batch["labels"].cpu()))
    if accepts_logits_to_keep(model):
        logits = model(**model_inputs(batch), logits_to_keep=positions).logits
    else:  # full logits, then the needed positions
        logits = model(**model_inputs(batch)).logits
        logits = torch.take_along_dim(logits, positions[..., None], dim=1)
    return cross_entropy_sum(logits, targets)


@torch.no_grad()
def packing_isolated(model: torch.nn.Module, examples: list[dict], pad_id: int, device,
                     tokens: int = 12) -> bool:
    """Whether ``model`` keeps packed examples apart: two examples' first ``tokens`` tokens are
    packed into one row (:func:`plora_ray.run.data.pack`); the second one's logits must be
    closer to its logits alone than the same row's logits with an all-ones attention mask (which
    lets it attend to the first) are, by far. A relative test, so bf16 rounding does not
    count as mixing. Every rank runs it (ZeRO-3 gathers in a forward)."""
    from plora_ray.run.data import pack

    rows = [{"input_ids": e["input_ids"][:tokens], "labels": e["labels"][:tokens]} for e in examples[:2]]
    packed = pack(rows, sum(len(r["input_ids"]) for r in rows), pad_id)
    ids, position = packed["input_ids"].to(device), packed["position_ids"].to(device)
    first = int(position[0, 1:].eq(0).nonzero()[0]) + 1  # where the row's second example starts
    second = ids[:, first:]
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=second, use_cache=False).logits[0, :].float()
        apart = model(input_ids=ids, position_ids=position, use_cache=False).logits[0, first:].float()
        mixed = model(input_ids=ids, position_ids=position, attention_mask=torch.ones_like(ids),
                      use_cache=False).logits[0, first:].float()
    finally:
        model.train(was_training)
    return bool((apart - alone).abs().mean() < 0.25 * (mixed - alone).abs().mean())
