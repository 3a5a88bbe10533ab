"""Evaluators: GSM8K extraction, generation, log-likelihood scoring, aggregation, limits, CLI,
and agreement with lm-evaluation-harness itself (skipped when lm-eval is not installed)."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plora_ray.config.schema import ModelConfig
from plora_ray.evaluation import evaluate, select
from plora_ray.evaluation.gsm8k import (
    exact_match,
    extract_flexible,
    extract_strict,
    generate_until,
    gsm8k_context,
    normalize,
)
from plora_ray.evaluation.multiple_choice import (
    aggregate_mmlu,
    encode_pair,
    evaluate_mmlu,
    loglikelihoods,
    score_choices,
)
from plora_ray.run.models import load_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_base(ModelConfig())
    model.eval()
    return model, tok


MMLU = [
    dict(question="What is 2+2?", subject="anatomy", choices=["3", "4", "5", "6"], answer=1),
    dict(question=" Which bone is longest? ", subject="anatomy", choices=["femur", "tibia", "ulna", "skull"], answer=0),
    dict(question="Ethics is?", subject="philosophy", choices=["a", "b", "c", "d"], answer=3),
    dict(question="Demand curves slope?", subject="econometrics", choices=["up", "down", "flat", "none"], answer=1),
]
MMLU_DEV = [dict(question=f"Dev q{i}?", subject=s, choices=["w", "x", "y", "z"], answer=i % 4)
            for s in ("anatomy", "philosophy", "econometrics") for i in range(2)]
ARC = [
    dict(id="a1", question="Which is a mammal?", choices=["dog", "trout", "eagle", "a very long answer text"],
         labels=list("ABCD"), gold=0),
    dict(id="a2", question="Water boils at?", choices=["100 C", "0 C", "50 degrees Celsius"],
         labels=["1", "2", "3"], gold=0),
    dict(id="a3", question="Plants make food by?", choices=["photosynthesis", "eating", "digging", "sleep"],
         labels=list("ABCD"), gold=0),
]
GSM = [
    dict(question="Tom has 3 apples and buys 2 more. How many?", answer="3+2=<<3+2=5>>5\n#### 5"),
    dict(question="What is 10 minus 4?", answer="10-4=6\n#### 6"),
    dict(question="A train goes 60 miles per hour for 2 hours. How far?", answer="60*2=120\n#### 120"),
]


# ------------------------------------------------------------------ GSM8K extraction

@pytest.mark.parametrize("text, strict, flexible", [
    ("So she has 5 + 2 = 7 apples.\n#### 7", "7", "7"),
    ("The total is $1,234.\n#### 1,234", "1,234", "1,234"),
    ("#### -3", "-3", "-3"),
    ("It costs $18 in total.", "[invalid]", "$18"),
    ("I had 3, then 5, so 8", "[invalid]", "8"),
    ("The answer is 42.", "[invalid]", "42."),
    ("no number here", "[invalid]", "[invalid]"),
    ("#### 12 and later 13", "12", "13"),
])
def test_gsm8k_filters(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize("pred, ref, ok", [
    ("1,234", "some work\n#### 1234", True),  # commas ignored
    ("$18", "#### 18", True),  # dollar ignored
    ("42.", "#### 42", True),  # trailing period ignored
    ("-3", "#### -3", True),
    ("3", "#### -3", False),
    ("5.00", "#### 5", False),  # lm-eval compares strings, not numbers
    ("[invalid]", "#### 7", False),
])
def test_gsm8k_exact_match(pred, ref, ok):
    assert exact_match(pred, ref) is ok


def test_gsm8k_reference_normalisation():
    assert normalize("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"


def test_gsm8k_extraction_matches_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    import yaml

    import lm_eval

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    metric_kwargs = {k: v for k, v in cfg["metric_list"][0].items()
                     if k not in ("metric", "aggregation", "higher_is_better")}
    filters = {f["name"]: RegexFilter(**{k: v for k, v in f["filter"][0].items() if k != "function"})
               for f in cfg["filter_list"]}
    texts = ["So 5 + 2 = 7.\n#### 7", "Total $1,234.\n#### 1,234", "#### -3", "It costs $18.", "3, 5, 8",
             "is 42.", "nothing", "#### 12 then 13", "", "5.00 dollars", "-.5 and 1,0,0", "#### $5"]
    refs = ["#### 7", "x\n#### 1234", "#### -3", "#### 18", "#### 8", "#### 42", "#### 1", "#### 13",
            "#### 0", "#### 5", "#### 100", "#### 5"]
    ours = {"strict-match": extract_strict, "flexible-extract": extract_flexible}
    for name, filt in filters.items():
        theirs = list(TakeFirstFilter().apply(filt.apply([[t] for t in texts], [{}] * len(texts)), None))
        assert theirs == [ours[name](t) for t in texts], name
        for pred, ref in zip(theirs, refs):
            expected = exact_match_hf_evaluate([pred], [ref], **metric_kwargs)["exact_match"]
            assert float(exact_match(pred, ref)) == expected, (pred, ref)


# ------------------------------------------------------------------ generation

def test_left_padded_batch_equals_unbatched(tiny):
    model, tok = tiny
    contexts = [gsm8k_context(tok, it, style) for it in GSM for style in ("chat", "plain")]
    batched = generate_until(model, tok, contexts, max_new_tokens=12, batch_size=len(contexts))
    single = [generate_until(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in contexts]
    assert batched == single
    assert all(batched)


def test_generation_cut_at_stop_string(tiny):
    model, tok = tiny
    ctx = gsm8k_context(tok, GSM[0], "plain")
    free = generate_until(model, tok, [ctx], stops=[], max_new_tokens=16)[0]
    stop = free[6:8]
    assert stop and len(free) > 8
    cut = generate_until(model, tok, [ctx], stops=[stop], max_new_tokens=16)[0]
    assert cut == free.split(stop)[0]


def test_gsm8k_chat_prompt_is_training_format(tiny):
    _, tok = tiny
    expected = tok.apply_chat_template([{"role": "user", "content": GSM[1]["question"]}],
                                       tokenize=False, add_generation_prompt=True)
    assert gsm8k_context(tok, GSM[1], "chat") == expected
    assert gsm8k_context(tok, GSM[1], "plain") == f"Question: {GSM[1]['question']}\nAnswer:"


# ------------------------------------------------------------------ log-likelihoods

def test_loglikelihoods_match_hand_computed(tiny):
    """Batched, grouped scoring = one unpadded full-sequence forward per request."""
    model, tok = tiny
    requests = [("Question: Which is a mammal?\nAnswer:", " dog"),
                ("Question: Which is a mammal?\nAnswer:", " a very long answer text"),
                ("What is 2+2?\nAnswer: ", "B"),  # trailing space moves onto the continuation
                ("ctx", "A"), ("ctx", "B"), ("short", " x")]
    got = loglikelihoods(model, tok, requests, batch_size=4)
    for (context, continuation), value in zip(requests, got):
        stripped = context.rstrip()
        cont_text = context[len(stripped):] + continuation
        ctx_ids = tok.encode(stripped)
        ids = tok.encode(stripped + cont_text)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(logp[p - 1, ids[p]].item() for p in range(len(ctx_ids), len(ids)))
        assert value == pytest.approx(expected, abs=1e-4)
    assert encode_pair(tok, "a: ", "b") == (tok.encode("a:"), tok.encode(" b"))


def test_shared_context_on_kv_cache_equals_full_forwards(tiny, monkeypatch):
    """ARC-style requests (one context, several multi-token continuations) run the context once
    and the continuations on its KV cache, also through a peft wrapper; the sums equal the
    full-sequence path (the one taken by a model without a cache) to float rounding."""
    from peft import LoraConfig, get_peft_model

    from plora_ray.evaluation import multiple_choice

    model, tok = tiny
    ctx = "Question: Which is a mammal?\nAnswer:"
    requests = [(ctx, " dog"), (ctx, " a very long answer text"), (ctx, " eagle"),
                ("Question: Water boils at?\nAnswer:", " 100 C"), ("Question: Water boils at?\nAnswer:", " 0 C")]
    calls = []
    original = multiple_choice._shared_context_jobs
    monkeypatch.setattr(multiple_choice, "_shared_context_jobs",
                        lambda *a: calls.append(a[3]) or original(*a))
    cached = loglikelihoods(model, tok, requests, batch_size=2)
    assert len(calls) == 2  # both contexts took the cache path
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        assert loglikelihoods(wrapped, tok, requests, batch_size=2) == pytest.approx(cached, abs=1e-5)
    finally:
        wrapped.unload()
    monkeypatch.setattr(multiple_choice, "_cache_argument", lambda m: None)
    full = loglikelihoods(model, tok, requests, batch_size=2)
    assert len(calls) == 4  # two more in the peft run; none without a cache
    assert cached == pytest.approx(full, abs=1e-4)
    assert len(set(cached)) == len(cached)  # five different sums, not one number repeated


def test_shared_context_head_runs_on_scored_positions_only(tiny, monkeypatch):
    """ARC-style continuations on a context's KV cache: the vocabulary projection runs on the
    context's last position and each continuation's scored positions, not on the padding after
    the short ones; the sums are those of the head on every position."""
    from plora_ray.evaluation import multiple_choice
    from plora_ray.evaluation.multiple_choice import encode_pair

    model, tok = tiny
    ctx = "Question: Which is a mammal?\nAnswer:"
    requests = [(ctx, " dog"), (ctx, " a very long answer text"), (ctx, " eagle")]
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        got = loglikelihoods(model, tok, requests, batch_size=3)
        conts = [encode_pair(tok, c, x)[1] for c, x in requests]
        assert sum(seen) == 1 + sum(len(c) - 1 for c in conts)  # the context's last position + the rest
        monkeypatch.setattr(multiple_choice, "head_on", lambda model, select: contextlib.nullcontext())
        seen.clear()
        full = loglikelihoods(model, tok, requests, batch_size=3)
        assert sum(seen) == 1 + len(conts) * (max(len(c) for c in conts) - 1)  # padding included
    finally:
        handle.remove()
    assert got == pytest.approx(full, abs=1e-6)


def test_dense_head_gives_the_head_row_major_input_and_the_same_logits(tiny):
    """``kv_prefix.dense_head``: a ``logits_to_keep=1`` forward's sliced hidden states reach the
    head with row-major strides (PyTorch's fast matmul path), the logits unchanged; the hook is
    gone afterwards, and ``evaluate`` runs under it."""
    from plora_ray.evaluation import kv_prefix, run

    model, tok = tiny
    head = model.get_output_embeddings()
    strides = []
    handle = head.register_forward_hook(lambda m, args, out: strides.append(args[0].stride()))
    ids = torch.tensor([tok.encode("one two three four five six")] * 2)
    try:
        plain = model(input_ids=ids, logits_to_keep=1).logits
        assert strides[-1][0] == ids.shape[1] * strides[-1][1]  # the sequence's row stride
        with kv_prefix.dense_head(model):
            dense = model(input_ids=ids, logits_to_keep=1).logits
            assert len(head._forward_pre_hooks) == 1
        assert strides[-1] == (strides[-1][1], strides[-1][1], 1)  # (B, 1, H) row-major
        assert torch.allclose(plain, dense, rtol=1e-5, atol=1e-6) and not head._forward_pre_hooks
        entered = []
        real = run.dense_head

        @contextlib.contextmanager
        def spy(m):
            entered.append(m)
            with real(m):
                yield

        run.dense_head = spy
        try:
            run.evaluate(model, tok, ["arc_easy"], 2)
        finally:
            run.dense_head = real
        assert entered == [model] and not head._forward_pre_hooks
    finally:
        handle.remove()


def test_common_prefix_of_a_batch_runs_once_with_the_same_loglikelihoods(tiny, monkeypatch):
    """MMLU-style requests (one-token answers after different questions behind the same long
    instruction) run the batch's common prefix once, the rest on copies of its KV cache: the
    sums of the plain batched forward, to float rounding."""
    from plora_ray.evaluation import kv_prefix

    model, tok = tiny
    head = "The following are multiple choice questions (with answers) about science.\n\n"
    requests = [(head + f"Question {q}?\nAnswer:", f" {c}") for q in ("one", "two two", "three") for c in "AB"]
    calls = []
    on_prefix = kv_prefix.logits_on_prefix
    monkeypatch.setattr(kv_prefix, "logits_on_prefix", lambda *a: calls.append(a[3]) or on_prefix(*a))
    shared = loglikelihoods(model, tok, requests, batch_size=4)
    assert calls and min(calls) >= kv_prefix.MIN_SHARED_PREFIX  # the batches took the cached path
    monkeypatch.setattr(kv_prefix, "MIN_SHARED_PREFIX", 10**9)
    n = len(calls)
    plain = loglikelihoods(model, tok, requests, batch_size=4)
    assert len(calls) == n and shared == pytest.approx(plain, abs=1e-5)
    assert len(set(shared)) == len(shared)


def test_arc_acc_norm_differs_from_acc():
    rec = score_choices([-5.0, -8.0], ["yes", "a much longer answer"], gold=1)
    assert (rec["pred"], rec["pred_norm"]) == (0, 1)
    assert (rec["acc"], rec["acc_norm"]) == (0.0, 1.0)
    tie = score_choices([-2.0, -2.0], ["ab", "cd"], gold=0)  # ties go to the first choice
    assert tie["pred"] == tie["pred_norm"] == 0


# ------------------------------------------------------------------ MMLU aggregation

def test_mmlu_aggregation_is_item_weighted():
    recs = [dict(subject="anatomy", category="stem", acc=a) for a in (1.0, 0.0, 0.0)]
    recs.append(dict(subject="philosophy", category="humanities", acc=1.0))
    out = aggregate_mmlu(recs)
    assert out["mmlu/acc"] == 0.5  # 2/4 items, not the mean of category means (0.667)
    assert out["mmlu/stem"] == pytest.approx(1 / 3)
    assert out["mmlu/humanities"] == 1.0
    assert "mmlu/social_sciences" not in out and out["mmlu/n"] == 4
    assert out["mmlu/subject/anatomy"] == pytest.approx(1 / 3)


def test_evaluate_mmlu_uses_categories(tiny):
    model, tok = tiny
    cats = {"anatomy": "stem", "philosophy": "humanities", "econometrics": "social_sciences"}
    metrics, recs = evaluate_mmlu(model, tok, MMLU, categories=cats, prompt_style="plain")
    assert [r["category"] for r in recs] == ["stem", "stem", "humanities", "social_sciences"]
    assert metrics["mmlu/acc"] == pytest.approx(sum(r["acc"] for r in recs) / 4)
    assert metrics["mmlu/stem"] == pytest.approx((recs[0]["acc"] + recs[1]["acc"]) / 2)


# ------------------------------------------------------------------ limit, evaluate()

def test_limit_first_and_sample_are_deterministic():
    rows = [{"i": i, "subject": "ab"[i % 2]} for i in range(20)]
    assert select(rows, 3) == rows[:3]
    assert select(rows, None) == rows
    a, b = select(rows, 5, "sample", seed=7), select(rows, 5, "sample", seed=7)
    assert a == b and len(a) == 5
    assert [r["i"] for r in a] == sorted(r["i"] for r in a)  # source order kept
    assert select(rows, 5, "sample", seed=8) != a
    spread = select(rows, 3, key="subject")  # MMLU: the limit is spread over subjects
    assert [r["i"] for r in spread] == [0, 1, 2]
    assert len(select(rows, 7, "sample", key="subject")) == 7
    assert {r["subject"] for r in select(rows, 2, "sample", key="subject")} == {"a", "b"}


def test_evaluate_metric_names_and_mode_restored(tiny):
    model, tok = tiny
    model.train()
    res = evaluate(model, tok, ["gsm8k", "mmlu", "arc_easy", "arc_challenge"], limit=3,
                   items={"gsm8k": GSM[:1], "mmlu": MMLU, "arc_easy": ARC[:1], "arc_challenge": ARC[1:2]},
                   max_new_tokens=4)
    assert model.training
    model.eval()
    for key in ("gsm8k/strict", "gsm8k/flexible", "mmlu/acc", "mmlu/stem", "mmlu/humanities",
                "mmlu/social_sciences", "arc_easy/acc", "arc_easy/acc_norm", "arc_challenge/acc",
                "arc_challenge/acc_norm"):
        assert 0.0 <= res[key] <= 1.0, key
    assert [len(res.samples[t]) for t in ("gsm8k", "mmlu", "arc_easy", "arc_challenge")] == [1, 3, 1, 1]
    json.dumps(res.to_json())
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; choose from gsm8k"):
        evaluate(model, tok, ["hellaswag"])


# ------------------------------------------------------------------ standard errors

def test_stderrs_equal_lm_eval_on_the_same_items(tiny):
    """Every metric has a ``_stderr`` sibling equal to lm-eval's ``mean_stderr`` over the
    per-item values it averages (the metric itself equal to lm-eval's ``mean``)."""
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    model, tok = tiny
    cats = {"anatomy": "stem", "philosophy": "humanities", "econometrics": "social_sciences"}
    res = evaluate(model, tok, ["gsm8k", "mmlu", "arc_easy"], items={"gsm8k": GSM, "mmlu": MMLU, "arc_easy": ARC},
                   max_new_tokens=4, prompt_style="plain", categories=cats)
    s = res.samples
    per_item = {"mmlu/acc": [r["acc"] for r in s["mmlu"]],
                "mmlu/stem": [r["acc"] for r in s["mmlu"] if r["category"] == "stem"],
                "mmlu/subject/anatomy": [r["acc"] for r in s["mmlu"] if r["subject"] == "anatomy"],
                "arc_easy/acc": [r["acc"] for r in s["arc_easy"]],
                "arc_easy/acc_norm": [r["acc_norm"] for r in s["arc_easy"]],
                "gsm8k/strict": [r["strict_match"] for r in s["gsm8k"]],
                "gsm8k/flexible": [r["flexible_match"] for r in s["gsm8k"]]}
    for key, values in per_item.items():
        assert res[key] == pytest.approx(lm_metrics.mean(values)), key
        assert res[f"{key}_stderr"] == pytest.approx(lm_metrics.mean_stderr(values)), key
    assert {k for k in res if not k.endswith(("/n", "_stderr"))} == {k.removesuffix("_stderr") for k in res
                                                                      if k.endswith("_stderr")}
    assert math.isnan(res["mmlu/humanities_stderr"])  # one item: undefined (lm-eval: N/A)


def test_mean_stderr_equals_lm_eval_formula():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    from analysis.stats import stderr  # the one standard error every evaluator logs

    for values in ([1, 0, 0, 1, 1], [2.5, 0.25, 7.0], [0.0, 0.0]):
        assert stderr(values) == pytest.approx(lm_metrics.mean_stderr(values), abs=1e-15)


# ------------------------------------------------------------------ CLI

@pytest.mark.parametrize("args, message", [
    (["tiny", "--tasks", "mmlu,foo"], "unknown task 'foo'"),
    (["/no/such/model/dir", "--tasks", "mmlu"], "model path not found"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "plora_ray.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_cli_writes_table_and_json(tmp_path, monkeypatch, capsys):
    from plora_ray.cli import evaluate as cli
    from plora_ray.evaluation import run

    monkeypatch.setattr(run, "default_items", lambda task, *_: {"arc_easy": ARC, "mmlu": MMLU}[task])
    out = tmp_path / "res.json"
    assert cli.main(["tiny", "--tasks", "arc_easy,mmlu", "--limit", "2", "--prompt-style", "plain",
                     "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "arc_easy/acc_norm" in table and "mmlu/acc" in table
    data = json.loads(out.read_text())
    assert data["metrics"]["arc_easy/n"] == 2 and len(data["samples"]["mmlu"]) == 2


def test_cli_loads_a_train_output_dir(tmp_path):
    """A ``python -m plora_ray.train`` output dir: base from config.yaml + merged weights."""
    from safetensors.torch import save_model

    from plora_ray.run.rundir import load_model
    from plora_ray.run.models import tiny_model, tiny_tokenizer

    trained = tiny_model(ModelConfig(), len(tiny_tokenizer()), seed=5)
    save_model(trained, str(tmp_path / "merged.safetensors"))
    (tmp_path / "config.yaml").write_text("name: x\nmodel:\n  name_or_path: tiny\n")
    model, _ = load_model(str(tmp_path))
    for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ agreement with lm-eval

def _lm_eval_tasks(tmp: Path, nshot: int, style: str):
    """lm-eval's own task YAMLs, pointed at local JSON files holding the same items."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.__file__).parent / "tasks"

    def dump(name, rows):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def local(cfg, name, test, shots):
        cfg = dict(cfg, dataset_path="json", dataset_name=None, test_split="test", num_fewshot=nshot,
                   dataset_kwargs={"data_files": {"test": dump(name, test), "fs": dump(name + "_fs", shots)},
                                   "cache_dir": str(tmp / "hf")},
                   fewshot_split="fs", fewshot_config={"sampler": "first_n"})
        cfg.pop("training_split", None)
        cfg.pop("validation_split", None)
        return ConfigurableTask(config=cfg)

    def arc_hf(r):
        return {"id": r["id"], "question": r["question"], "answerKey": r["labels"][r["gold"]],
                "choices": {"text": r["choices"], "label": r["labels"]}}

    tasks = {}
    for subj in ("anatomy", "philosophy", "econometrics"):
        tasks[f"mmlu_{subj}"] = local(load_yaml(root / f"mmlu/default/mmlu_{subj}.yaml"), f"mmlu_{subj}",
                                      [r for r in MMLU if r["subject"] == subj],
                                      [r for r in MMLU_DEV if r["subject"] == subj])
    tasks["arc_easy"] = local(load_yaml(root / "arc/arc_easy.yaml"), "arc",
                              [arc_hf(r) for r in ARC], [arc_hf(r) for r in ARC[::-1]])
    if style == "plain":
        cfg = load_yaml(root / "gsm8k/gsm8k.yaml")
        cfg["generation_kwargs"] = dict(cfg["generation_kwargs"], max_gen_toks=16)
        tasks["gsm8k"] = local(cfg, "gsm", GSM, GSM[::-1])
    return tasks


@pytest.mark.parametrize("nshot, style", [(0, "plain"), (2, "plain"), (0, "chat")])
def test_agrees_with_lm_eval(tiny, tmp_path, nshot, style):
    """Same model, same items: lm-eval's per-item log-likelihoods, acc, acc_norm, generations
    and filtered answers equal ours. ``chat`` = lm-eval's --apply_chat_template (MC only: our
    chat GSM8K prompt is the training format, deliberately not lm-eval's)."""
    pytest.importorskip("lm_eval")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id  # tiny's default config says id 2 ('#')
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3)
        res = evaluator.evaluate(lm, _lm_eval_tasks(tmp_path, nshot, style), log_samples=True,
                                 bootstrap_iters=0, apply_chat_template=style == "chat", verbosity="ERROR")
    finally:
        model.generation_config.eos_token_id = eos
    tasks = ["mmlu", "arc_easy"] + (["gsm8k"] if style == "plain" else [])
    ours = evaluate(model, tok, tasks, None, prompt_style=style, batch_size=3, num_fewshot=nshot,
                    items={"mmlu": MMLU, "arc_easy": ARC, "gsm8k": GSM}, max_new_tokens=16,
                    fewshot_items={"mmlu": MMLU_DEV, "arc_easy": ARC[::-1], "gsm8k": GSM[::-1]})

    def by_doc(name):
        return sorted(res["samples"][name], key=lambda s: s["doc_id"])

    theirs_mmlu = [s for subj in ("anatomy", "philosophy", "econometrics") for s in by_doc(f"mmlu_{subj}")]
    theirs_mmlu.sort(key=lambda s: [r["question"] for r in MMLU].index(s["doc"]["question"]))
    for theirs, mine in zip(theirs_mmlu, ours.samples["mmlu"], strict=True):
        assert [ll for ll, _ in theirs["filtered_resps"]] == pytest.approx(mine["lls"], abs=1e-4)
        assert theirs["acc"] == mine["acc"]
    for theirs, mine in zip(by_doc("arc_easy"), ours.samples["arc_easy"], strict=True):
        assert [ll for ll, _ in theirs["filtered_resps"]] == pytest.approx(mine["lls"], abs=1e-4)
        assert (theirs["acc"], theirs["acc_norm"]) == (mine["acc"], mine["acc_norm"])
    if style == "plain":
        samples = res["samples"]["gsm8k"]
        for filt, key in (("strict-match", "strict"), ("flexible-extract", "flexible")):
            theirs = sorted((s for s in samples if s["filter"] == filt), key=lambda s: s["doc_id"])
            for t, mine in zip(theirs, ours.samples["gsm8k"], strict=True):
                assert t["resps"][0][0] == mine["generation"]
                assert t["filtered_resps"][0] == mine[key]
                assert t["exact_match"] == mine[f"{key}_match"]
