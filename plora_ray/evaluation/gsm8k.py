"""GSM8K: greedy generation until a stop string, then lm-eval's two answer filters + exact match.

Definitions follow lm-evaluation-harness 0.4.13 ``lm_eval/tasks/gsm8k/gsm8k.yaml``:

* ``strict-match``: regex ``#### (\\-?[0-9\\.\\,]+)``, first match, then ``take_first``.
* ``flexible-extract``: regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, the *last* match
  (``group_select: -1``), first non-empty group; ``[invalid]`` when nothing matches.
* ``exact_match`` with ``ignore_case``, and ``regexes_to_ignore`` ``,`` ``\\$`` ``(?s).*#### ``
  ``\\.$`` applied in that order to prediction *and* reference; the reference is the full
  solution (``doc_to_target: {{answer}}``), which ``(?s).*#### `` reduces to the number.

Generation follows ``HFLM.generate_until``: stop strings ``Question:``, ``</s>``,
``<|im_end|>`` plus the tokenizer's EOS text; contexts left-truncated to
``max_length - max_new_tokens`` and left-padded in batches; the continuation is decoded with
special tokens skipped and cut at the first stop string. Rows stop individually (lm-eval keeps
generating until the whole batch has stopped, then cuts; the kept text is the same).

Sharded (``sharding.Shard``): each rank generates for every world-th item; under ``lockstep``
(ZeRO-3) ``generate`` runs with ``synced_gpus=True`` and the number of ``generate`` calls is
padded to the largest over ranks with one-token dummy calls.

Prompts. ``plain``: lm-eval's ``Question: {q}\\nAnswer:`` with few-shot examples
``Question: {q}\\nAnswer: {full solution}\\n\\n`` before it. ``chat`` (default): the training
format of the embedded mix (``plora_ray.assets.mix``): the user turn is the bare question and
the model answers after the assistant generation prompt; few-shot examples are earlier
user/assistant turns with the calculator annotations removed, as in training.
"""

from __future__ import annotations

import re

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from plora_ray.evaluation.multiple_choice import build_context, fewshot_block, max_length, render_chat, tok_encode
from plora_ray.evaluation.sharding import LOCAL, Shard
from analysis.stats import with_stderr

__all__ = [
    "FLEXIBLE_PATTERN",
    "IGNORE_REGEXES",
    "STOP_STRINGS",
    "STRICT_PATTERN",
    "evaluate_gsm8k",
    "exact_match",
    "extract_flexible",
    "extract_strict",
    "generate_until",
    "gsm8k_context",
    "normalize",
    "regex_filter",
]

STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_REGEXES = (",", r"\$", r"(?s).*#### ", r"\.$")
FALLBACK = "[invalid]"
_CALC = re.compile(r"<<[^<>]*>>")


# ------------------------------------------------------------------ filters and metric


def regex_filter(text: str, pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval ``RegexFilter`` on one response."""
    matches = re.findall(pattern, text if isinstance(text, str) else "")
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        found = [m for m in match if m]
        match = found[0] if found else fallback
    return match.strip()


def extract_strict(text: str) -> str:
    return regex_filter(text, STRICT_PATTERN, 0)


def extract_flexible(text: str) -> str:
    return regex_filter(text, FLEXIBLE_PATTERN, -1)


def normalize(text: str) -> str:
    """gsm8k.yaml ``exact_match`` kwargs: ``regexes_to_ignore`` in order, then lower-case."""
    for pattern in IGNORE_REGEXES:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


# ------------------------------------------------------------------ prompts


def gsm8k_context(tokenizer, item: dict, style: str = "chat", fewshot: list[dict] | None = None) -> str:
    """Generation context for ``item`` (see the module docstring for both styles)."""
    fewshot = fewshot or []
    if style == "plain":
        shots = fewshot_block([(f"Question: {r['question']}\nAnswer:", r["answer"]) for r in fewshot])
        return build_context(tokenizer, shots + f"Question: {item['question']}\nAnswer:", style="plain")
    messages = []
    for r in fewshot:
        messages += [{"role": "user", "content": r["question"]},
                     {"role": "assistant", "content": _CALC.sub("", r["answer"]).strip()}]
    return render_chat(tokenizer, messages + [{"role": "user", "content": item["question"]}])


# ------------------------------------------------------------------ generation


class _StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated text contains a stop string (decoded with special
    tokens, as lm-eval's ``MultiTokenEOSCriteria`` checks)."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any generation-config EOS that is a special token. Why the
    filter: a config built from defaults (the ``tiny`` Llama) names ids 1/2, which are
    ordinary byte tokens of the tiny tokenizer (``#`` is id 2)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    special = set(tokenizer.all_special_ids)
    for i in cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]:
        if i is not None and i in special and i not in ids:
            ids.append(i)
    return ids


def cut_at_stops(text: str, stops) -> str:
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@torch.inference_mode()
def generate_until(model, tokenizer, contexts: list[str], stops=STOP_STRINGS,
                   max_new_tokens: int = 256, batch_size: int = 8, shard: Shard = LOCAL) -> list[str]:
    """Greedy continuations of ``contexts``, each cut at the first stop string (or EOS).

    ``shard`` only matters under lockstep: ``contexts`` are this rank's share, and the
    ``generate`` calls are synchronised with the other ranks (module docstring)."""
    stops = list(stops)
    eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) \
        if tokenizer.eos_token_id is not None else None
    if eos_text and eos_text not in stops:
        stops.append(eos_text)
    max_ctx = max_length(model, tokenizer) - max_new_tokens
    if max_ctx <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    encoded = [tok_encode(tokenizer, c)[-max_ctx:] for c in contexts]
    order = sorted(range(len(contexts)), key=lambda i: -len(encoded[i]))  # similar lengths batch
    out = [""] * len(contexts)
    synced = shard.lockstep and shard.distributed
    n_batches = -(-len(order) // batch_size)
    for b in range(shard.agree_count(n_batches, device)):
        if b >= n_batches:  # lockstep padding: keeps stepping with the other ranks, then stops
            one = torch.tensor([[pad_id]], device=device)
            model.generate(input_ids=one, attention_mask=torch.ones_like(one), do_sample=False,
                           max_new_tokens=1, pad_token_id=pad_id, synced_gpus=True,
                           temperature=None, top_p=None, top_k=None)
            continue
        idx = order[b * batch_size:(b + 1) * batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # LEFT padding: every prompt ends where generation starts
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids or None,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(tokenizer, stops, width)]),
            temperature=None, top_p=None, top_k=None, synced_gpus=synced,
        )
        for row, i in enumerate(idx):
            toks = gen[row, width:].tolist()
            for j, t in enumerate(toks):  # finished rows are padded after their EOS
                if t in eos_ids:
                    toks = toks[: j + 1]
                    break
            out[i] = cut_at_stops(tokenizer.decode(toks, skip_special_tokens=True), stops)
    return out


# ------------------------------------------------------------------ task


def score_generation(generation: str, answer: str) -> dict:
    """Per-item record: both filters' extractions and exact-match results."""
    strict, flexible = extract_strict(generation), extract_flexible(generation)
    return {"generation": generation, "target": normalize(answer), "strict": strict,
            "flexible": flexible, "strict_match": float(exact_match(strict, answer)),
            "flexible_match": float(exact_match(flexible, answer))}


def evaluate_gsm8k(model, tokenizer, items: list[dict], *, prompt_style: str = "chat",
                   batch_size: int = 8, num_fewshot: int = 0, fewshot_items: list[dict] | None = None,
                   max_new_tokens: int = 256, shard: Shard = LOCAL) -> tuple[dict, list[dict]]:
    """(metrics ``gsm8k/strict``, ``gsm8k/flexible`` and their ``_stderr``, records) over
    GSM8K ``items``.

    Few-shot examples are the first ``num_fewshot`` of ``fewshot_items`` (lm-eval samples
    them from GSM8K *train*, which is not available offline).
    """
    shots = (fewshot_items or [])[:num_fewshot] if num_fewshot > 0 else []
    if len(shots) < num_fewshot:
        raise ValueError(f"gsm8k {num_fewshot}-shot needs {num_fewshot} few-shot rows, got {len(shots)}")
    local = shard.take(items)
    contexts = [gsm8k_context(tokenizer, it, prompt_style, shots) for it in local]
    gens = generate_until(model, tokenizer, contexts, STOP_STRINGS, max_new_tokens, batch_size, shard)
    records = [{"id": it.get("id"), **score_generation(g, it["answer"])} for g, it in zip(gens, local)]
    records = shard.gather(records, len(items))
    metrics = {**with_stderr("gsm8k/strict", [r["strict_match"] for r in records]),
               **with_stderr("gsm8k/flexible", [r["flexible_match"] for r in records]),
               "gsm8k/n": len(records)}
    return metrics, records
