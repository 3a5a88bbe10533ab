"""Log-likelihood multiple choice (MMLU, ARC-Easy, ARC-Challenge) as lm-evaluation-harness does it.

Why re-implement instead of calling lm-eval: it is not a dependency of this project, it needs
datasets from the hub, and a per-checkpoint evaluation inside a training run must work on an
in-memory (peft-wrapped) model with a bounded item count. Every definition below follows
lm-eval 0.4.13 (``lm_eval/tasks/{mmlu,arc}``, ``api/task.py``, ``models/huggingface.py``); the
agreement test in ``tests/test_evaluation.py`` runs lm-eval itself on the same items when it
is installed.

* Prompts. ``plain``: lm-eval's text prompt: description + few-shot block + ``doc_to_text``;
  every choice is scored as ``" " + choice`` (``target_delimiter``). ``chat``: lm-eval's
  ``--apply_chat_template`` rendering: description as the system turn, the rest of the plain
  prompt as one user turn, the assistant generation prompt, and the choice scored with *no*
  leading delimiter (lm-eval drops ``target_delimiter`` under a chat template).
* Scoring (``HFLM._encode_pair`` / ``_loglikelihood_tokens``): trailing whitespace of the
  context moves onto the continuation; context+continuation are tokenised *together* and the
  continuation is whatever follows the context's own token count (so merges across the
  boundary are scored as lm-eval scores them); batches are right-padded, no attention mask (the
  model is causal, so padding never reaches a scored position); the score is the sum of the
  continuation's token log-probs.
* Metrics (``ConfigurableTask.process_results``): ``acc`` = argmax of the log-likelihoods,
  ``acc_norm`` = argmax of log-likelihood / ``len(choice)`` in *characters* of the choice
  without its delimiter; ties go to the first choice (``np.argmax``).
* MMLU aggregation: subject, category (stem, humanities, social_sciences, other) and overall
  accuracies are means over *items* (lm-eval's groups use ``weight_by_size: True``).
* Standard errors: ``<metric>_stderr`` beside every metric, lm-eval's ``mean_stderr`` over the
  items it averages (``stats.py``).
* Sharding: with a ``Shard`` of world > 1 each rank scores every world-th item and the records
  are gathered in item order on every rank (``sharding.py``).
"""

from __future__ import annotations


import jinja2
import torch
import torch.nn.functional as F

from plora_ray.evaluation.kv_prefix import cache_argument as _cache_argument
from plora_ray.evaluation.kv_prefix import forward_logits, head_on, selected_logits
from plora_ray.evaluation.sharding import LOCAL, Shard
from analysis.stats import with_stderr

__all__ = [
    "MMLU_GROUPS",
    "arc_prompt",
    "build_context",
    "encode_pair",
    "evaluate_arc",
    "evaluate_mmlu",
    "loglikelihoods",
    "max_length",
    "mmlu_description",
    "mmlu_prompt",
    "render_chat",
    "score_choices",
    "tok_encode",
]

MMLU_GROUPS = ("stem", "humanities", "social_sciences", "other")
MMLU_LETTERS = ["A", "B", "C", "D"]  # lm-eval mmlu doc_to_choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval default fewshot_delimiter
TARGET_DELIMITER = " "  # lm-eval default target_delimiter


# ------------------------------------------------------------------ tokenisation and prompts


def tok_encode(tokenizer, text: str) -> list[int]:
    """``HFLM.tok_encode``: the tokenizer's own special-token default, unless ``text`` already
    starts with the prefix (BOS, else EOS) token, so a chat template's BOS is not doubled."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs = {}
    if prefix_id is not None and text.startswith(tokenizer.decode([prefix_id])):
        kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def max_length(model, tokenizer=None, default: int = 2048) -> int:
    """Context window as lm-eval's ``resolve_max_length`` finds it."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    return int(mml) if mml is not None and mml < 10**12 else default


def render_chat(tokenizer, messages: list[dict]) -> str:
    """Chat-template text with the assistant generation prompt (``HFLM.apply_chat_template``:
    on a template error, retried without the system turn)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:
        messages = [m for m in messages if m["role"] != "system"]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_context(tokenizer, user: str, description: str = "", style: str = "chat") -> str:
    """Full context: plain ``description + user``, or the chat rendering lm-eval uses
    (description as system turn, ``user`` as the single user turn, generation prompt)."""
    if style == "plain":
        return description + user
    messages = [{"role": "system", "content": description}] if description else []
    return render_chat(tokenizer, messages + [{"role": "user", "content": user}])


def fewshot_block(examples: list[tuple[str, str]]) -> str:
    """lm-eval's few-shot text: ``q + " " + a + "\\n\\n"`` per example."""
    return "".join(q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER for q, a in examples)


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_prompt(item: dict) -> str:
    """lm-eval mmlu ``doc_to_text``."""
    c = item["choices"]
    return (f"{item['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


def arc_prompt(item: dict) -> str:
    """lm-eval arc ``doc_to_text``."""
    return f"Question: {item['question']}\nAnswer:"


# ------------------------------------------------------------------ log-likelihood scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``HFLM._encode_pair`` for a causal LM (see module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _forward_logprobs(model, batch: torch.Tensor, keep: torch.Tensor, rows=None, arg=None) -> torch.Tensor:
    """fp32 log-softmax at sequence positions ``keep`` only: full-vocabulary logits for every
    position of a long MMLU prompt would cost GBs on CPU. With ``rows`` and a cache ``arg``,
    the rows' common prefix runs once (:func:`kv_prefix.forward_logits`)."""
    return F.log_softmax(forward_logits(model, batch, keep, rows, arg).float(), dim=-1)


def dummy_forward(model, tokenizer, device) -> None:
    """One forward pass on a single token, result dropped: a lockstep rank's padding batch."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _forward_logprobs(model, torch.tensor([[pad_id]], device=device), torch.tensor([0], device=device))


def _shared_context_jobs(model, arg: str, device, ctx: list[int], members: list[tuple[int, list[int]]], out):
    """Forward calls scoring several continuations of one context: the context once (its last
    position predicts every continuation's first token), then all continuations as one
    right-padded batch on copies of its KV cache. The same sums as full-sequence forwards, to
    float rounding; a multiple-choice item costs ``len(ctx) + sum(len(cont))`` tokens, not
    ``n · len(ctx) + sum(len(cont))``."""
    state = {}

    def prefix():
        res = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, logits_to_keep=1)
        state["first"] = F.log_softmax(res.logits[0, -1].float(), dim=-1).cpu()
        state["cache"] = res[arg]
        if width == 0:
            finish(None)

    def finish(rest):
        at = 0  # rest: the scored positions' log-softmax, row after row
        for i, cont in members:
            total = state["first"][cont[0]]
            if len(cont) > 1:
                n = len(cont) - 1
                total = total + rest[torch.arange(at, at + n), torch.tensor(cont[1:])].sum()
                at += n
            out[i] = float(total)

    def continuations():
        cache = state.pop("cache")
        cache.batch_repeat_interleave(len(members))
        batch = torch.zeros((len(members), width), dtype=torch.long)
        scored = torch.zeros((len(members), width), dtype=torch.bool)
        for row, (_, cont) in enumerate(members):
            batch[row, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
            scored[row, : len(cont) - 1] = True
        scored = scored.to(device)
        with head_on(model, scored):  # the head and the softmax skip the padding after short choices
            logits = model(input_ids=batch.to(device), use_cache=True, **{arg: cache}).logits
        finish(F.log_softmax(selected_logits(logits, scored).float(), dim=-1).cpu())

    width = max(len(cont) for _, cont in members) - 1
    return [prefix] if width == 0 else [prefix, continuations]


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   shard: Shard = LOCAL) -> list[float]:
    """Sum of log p(continuation | context) for each ``(context, continuation)``.

    Requests are sorted longest first (as lm-eval) and batched with right padding. Requests
    whose context + continuation[:-1] tokens coincide (MMLU's one-token letters) share one
    forward pass: lm-eval's ``logits_cache``. Requests that share a context but not the
    rest (ARC's choices) run the context once and the continuations on its KV cache, when the
    model takes a cache and nothing is truncated. The numbers are lm-eval's either way (to float
    rounding). Under a lockstep ``shard`` the forward calls are padded to the largest count over
    ranks.
    """
    limit = max_length(model, tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    contexts: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError("empty context: lm-eval would condition on the BOS/EOS token instead")
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        key = tuple((ctx + cont)[-(limit + 1):][:-1])  # the model input, left-truncated
        groups.setdefault(key, []).append((i, cont))
        if len(ctx) + len(cont) <= limit:
            contexts.setdefault(tuple(ctx), []).append((i, cont))
    out = [0.0] * len(requests)
    jobs = []
    arg = _cache_argument(model)
    prefix_arg = None if shard.lockstep and shard.distributed else arg  # lockstep: one forward a job
    if arg is not None:
        for ctx, members in contexts.items():
            if len({tuple(cont[:-1]) for _, cont in members}) > 1:
                jobs += _shared_context_jobs(model, arg, device, list(ctx), members, out)
                for i, cont in members:
                    key = ctx + tuple(cont[:-1])
                    groups[key] = [m for m in groups[key] if m[0] != i]
                    if not groups[key]:
                        del groups[key]
    order = sorted(groups, key=lambda k: (-len(k), k))

    def batched(keys):
        def job():
            width = len(keys[0])
            batch = torch.full((len(keys), width), pad_id, dtype=torch.long)
            for row, key in enumerate(keys):
                batch[row, : len(key)] = torch.tensor(key, dtype=torch.long)
            contlen = max(len(c) for k in keys for _, c in groups[k])
            lo = max(0, min(len(k) for k in keys) - contlen)
            keep = torch.arange(lo, width)
            logprobs = _forward_logprobs(model, batch.to(device), keep.to(device), keys, prefix_arg).cpu()
            for row, key in enumerate(keys):
                for i, cont in groups[key]:
                    pos = torch.arange(len(key) - len(cont), len(key)) - lo
                    out[i] = float(logprobs[row, pos, torch.tensor(cont)].sum())
        return job

    jobs = [batched(order[b:b + batch_size]) for b in range(0, len(order), batch_size)] + jobs
    for j in range(shard.agree_count(len(jobs), device)):
        if j < len(jobs):
            jobs[j]()
        else:
            dummy_forward(model, tokenizer, device)
    return out


def score_choices(lls: list[float], choices: list[str], gold: int) -> dict:
    """lm-eval ``process_results`` for ``multiple_choice``: acc and acc_norm (per character)."""
    pred = _argmax(lls)
    pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, choices)])
    return {"pred": pred, "pred_norm": pred_norm, "gold": gold,
            "acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "lls": list(lls)}


def _argmax(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


# ------------------------------------------------------------------ tasks


def _mc_requests(tokenizer, user: str, description: str, choices: list[str], style: str):
    context = build_context(tokenizer, user, description, style)
    delim = TARGET_DELIMITER if style == "plain" else ""
    return [(context, delim + c) for c in choices]


def _run_mc(model, tokenizer, per_item, batch_size, shard: Shard = LOCAL):
    """Score ``per_item`` = [(requests, choices, gold)] in one batched pass; per-item records."""
    flat = [r for reqs, _, _ in per_item for r in reqs]
    lls = loglikelihoods(model, tokenizer, flat, batch_size, shard)
    records, at = [], 0
    for reqs, choices, gold in per_item:
        records.append(score_choices(lls[at:at + len(reqs)], choices, gold))
        at += len(reqs)
    return records


def _mmlu_fewshot(fewshot_items: list[dict] | None, subject: str, n: int) -> str:
    """lm-eval mmlu few-shot: the first ``n`` dev rows of the same subject (``first_n``)."""
    if n <= 0:
        return ""
    pool = [r for r in fewshot_items or [] if r["subject"] == subject][:n]
    if len(pool) < n:
        raise ValueError(f"MMLU {n}-shot needs {n} few-shot rows for {subject!r}, got {len(pool)}")
    return fewshot_block([(mmlu_prompt(r), MMLU_LETTERS[r["answer"]]) for r in pool])


def evaluate_mmlu(model, tokenizer, items: list[dict], *, categories: dict[str, str],
                  prompt_style: str = "chat", batch_size: int = 8, num_fewshot: int = 0,
                  fewshot_items: list[dict] | None = None, shard: Shard = LOCAL) -> tuple[dict, list[dict]]:
    """(metrics, records) over MMLU ``items``; ``categories`` maps subject -> group."""
    per_item, local = [], shard.take(items)
    for it in local:
        user = _mmlu_fewshot(fewshot_items, it["subject"], num_fewshot) + mmlu_prompt(it)
        reqs = _mc_requests(tokenizer, user, mmlu_description(it["subject"]), MMLU_LETTERS, prompt_style)
        per_item.append((reqs, MMLU_LETTERS, it["answer"]))
    records = _run_mc(model, tokenizer, per_item, batch_size, shard)
    for it, rec in zip(local, records):
        rec["id"] = it.get("id")
        rec["subject"] = it["subject"]
        rec["category"] = categories.get(it["subject"])
    records = shard.gather(records, len(items))
    return aggregate_mmlu(records), records


def aggregate_mmlu(records: list[dict]) -> dict:
    """Item-weighted accuracies with standard errors: overall, per category (only those
    present) and per subject."""
    out = {**with_stderr("mmlu/acc", [r["acc"] for r in records]), "mmlu/n": len(records)}
    for group in MMLU_GROUPS:
        accs = [r["acc"] for r in records if r.get("category") == group]
        if accs:
            out.update(with_stderr(f"mmlu/{group}", accs))
    for subject in sorted({r["subject"] for r in records}):
        out.update(with_stderr(f"mmlu/subject/{subject}", [r["acc"] for r in records if r["subject"] == subject]))
    return out


def evaluate_arc(model, tokenizer, items: list[dict], *, task: str = "arc_easy",
                 prompt_style: str = "chat", batch_size: int = 8, num_fewshot: int = 0,
                 fewshot_items: list[dict] | None = None, shard: Shard = LOCAL) -> tuple[dict, list[dict]]:
    """(metrics, records) over ARC ``items``: ``{task}/acc`` and ``{task}/acc_norm`` (and
    their ``_stderr``).

    Few-shot examples are the first ``num_fewshot`` of ``fewshot_items`` (lm-eval samples
    them from ARC *train*, which is not available offline).
    """
    shots = ""
    if num_fewshot > 0:
        pool = (fewshot_items or [])[:num_fewshot]
        if len(pool) < num_fewshot:
            raise ValueError(f"{task} {num_fewshot}-shot needs {num_fewshot} few-shot rows, got {len(pool)}")
        shots = fewshot_block([(arc_prompt(r), r["choices"][r["gold"]]) for r in pool])
    local = shard.take(items)
    per_item = [(_mc_requests(tokenizer, shots + arc_prompt(it), "", it["choices"], prompt_style),
                 it["choices"], it["gold"]) for it in local]
    records = _run_mc(model, tokenizer, per_item, batch_size, shard)
    for it, rec in zip(local, records):
        rec["id"] = it.get("id")
    records = shard.gather(records, len(items))
    metrics = {**with_stderr(f"{task}/acc", [r["acc"] for r in records]),
               **with_stderr(f"{task}/acc_norm", [r["acc_norm"] for r in records]), f"{task}/n": len(records)}
    return metrics, records
