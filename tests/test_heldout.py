"""Held-out loss (teacher-forced, assistant tokens), its split from training, the checkpoint
evaluation (final-only tasks, metric names, per-item results) and the EvalConfig keys."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from plora_ray.config.evaluation import EvalConfig
from plora_ray.config.schema import ConfigError, ModelConfig
from plora_ray.config.names import IGNORE
from plora_ray.run.data import load_examples
from plora_ray.evaluation import (
    evaluate_checkpoint,
    evaluate_heldout,
    heldout_losses,
    load_heldout,
    prepare_heldout,
    split_heldout,
)
from plora_ray.evaluation import run as run_mod
from plora_ray.run.models import load_base

ARC = [dict(id=f"arc-{i}", question=f"Q{i}?", choices=["yes", "no", "maybe"], labels=list("ABC"), gold=i % 3)
       for i in range(3)]
GSM = [dict(question="What is 2 plus 3?", answer="2+3=5\n#### 5"), dict(question="7 minus 1?", answer="#### 6")]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_base(ModelConfig())
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def examples(tiny):
    _, tok = tiny
    return load_heldout(["tiny-dialogues"], tok, max_length=48)[:7]


def test_heldout_loss_equals_hand_computation(tiny, examples):
    """Batched, right-padded, logits only at scored positions = one unpadded forward per
    example with the labels shifted by one; the task loss is token-weighted."""
    model, tok = tiny
    assert any(e["labels"][0] == IGNORE and len(e["input_ids"]) == 48 for e in examples)  # truncated ones too
    got = heldout_losses(model, tok, examples, batch_size=3)
    hand = []
    for e in examples:
        with torch.no_grad():
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(e["labels"][1:])
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        hand.append((nll / int((labels != IGNORE).sum()), int((labels != IGNORE).sum())))
    for (loss, n), (h_loss, h_n) in zip(got, hand, strict=True):
        assert n == h_n and loss == pytest.approx(h_loss, abs=1e-5)
    metrics, records = evaluate_heldout(model, tok, examples, batch_size=4)
    assert metrics["heldout/loss"] == pytest.approx(sum(l * n for l, n in hand) / sum(n for _, n in hand), abs=1e-5)
    assert metrics["heldout/tokens"] == sum(n for _, n in hand) and metrics["heldout/n"] == 7
    assert [r["id"] for r in records] == [e["id"] for e in examples]


def test_shared_prefix_runs_once_on_a_kv_cache_with_the_same_losses(tiny, examples, monkeypatch):
    """Rows that begin alike (a system prompt) run those tokens once, the rest of every row on
    copies of their KV cache: the losses of one full forward per example, to fp32 rounding."""
    from plora_ray.evaluation import kv_prefix

    model, tok = tiny
    system = list(range(5, 17))  # 12 tokens every row starts with, never scored
    rows = [{"id": e["id"], "input_ids": system + e["input_ids"], "labels": [IGNORE] * 12 + e["labels"]}
            for e in examples]
    assert kv_prefix.shared_prefix([r["input_ids"] for r in rows], 40) >= kv_prefix.MIN_SHARED_PREFIX
    calls = []
    on_prefix = kv_prefix.logits_on_prefix
    monkeypatch.setattr(kv_prefix, "logits_on_prefix", lambda *a: calls.append(a[3]) or on_prefix(*a))
    got = heldout_losses(model, tok, rows, batch_size=3)
    assert len(calls) == 3 and all(n >= 12 for n in calls)  # every batch took the cached path
    monkeypatch.setattr(kv_prefix, "MIN_SHARED_PREFIX", 10**9)  # the plain path
    plain = heldout_losses(model, tok, rows, batch_size=3)
    assert len(calls) == 3
    for (loss, n), (p_loss, p_n) in zip(got, plain, strict=True):
        assert n == p_n and loss == pytest.approx(p_loss, abs=1e-5)
    assert kv_prefix.shared_prefix([[1, 2, 3], [1, 2, 4]], 10) == 2
    assert kv_prefix.shared_prefix([[1, 2, 3], [1, 2, 3, 4]], 10) == 2  # a token left in each row
    assert kv_prefix.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 4]], 1) == 1  # not past the first scored position


def test_head_runs_only_on_scored_positions_with_the_same_losses(tiny, examples, monkeypatch):
    """The vocabulary projection sees only the positions a row is scored at (not its prompt
    or padding), in both the cached and the plain path: the same losses to fp32 rounding."""
    from plora_ray.evaluation import kv_prefix

    model, tok = tiny
    system = list(range(5, 17))
    rows = [{"id": e["id"], "input_ids": system + e["input_ids"], "labels": [IGNORE] * 12 + e["labels"]}
            for e in examples]
    scored = sum(sum(label != IGNORE for label in r["labels"][1:]) for r in rows)
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        for min_prefix in (kv_prefix.MIN_SHARED_PREFIX, 10**9):  # the cached path, the plain one
            monkeypatch.setattr(kv_prefix, "MIN_SHARED_PREFIX", min_prefix)
            seen.clear()
            got = heldout_losses(model, tok, rows, batch_size=3)
            assert sum(seen) == scored  # a cached prefix's forward runs the head on no position
            with monkeypatch.context() as m:  # the reference: the head on every kept position
                m.setattr("plora_ray.evaluation.heldout.head_on", lambda model, select: contextlib.nullcontext())
                full = heldout_losses(model, tok, rows, batch_size=3)
            assert sum(n for n in seen if n > 1) > scored
            for (loss, n), (f_loss, f_n) in zip(got, full, strict=True):
                assert n == f_n and loss == pytest.approx(f_loss, abs=1e-5)
    finally:
        handle.remove()
    logits = torch.zeros(2, 3, 5)
    select = torch.tensor([[True, False, True], [False, False, True]])
    assert kv_prefix.selected_logits(logits, select).shape == (3, 5)
    assert kv_prefix.selected_logits(torch.zeros(1, 3, 5), select).shape == (3, 5)


def test_cross_entropy_in_row_chunks_is_bitwise_the_one_pass(tiny, examples, monkeypatch):
    """The held-out cross-entropy over chunks of rows (each cast to fp32 on its own) gives
    bitwise the losses of one fp32 copy of all logits."""
    from plora_ray.evaluation import heldout

    model, tok = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(heldout, "ROW_CHUNK_BYTES", 3 * 4 * vocab)  # 3 rows a chunk
    chunked = heldout_losses(model, tok, examples, batch_size=4)
    monkeypatch.setattr(heldout, "ROW_CHUNK_BYTES", 2**62)  # one chunk: the plain form
    assert chunked == heldout_losses(model, tok, examples, batch_size=4)
    logits, targets = torch.randn(7, vocab), torch.randint(0, vocab, (7,))
    monkeypatch.setattr(heldout, "ROW_CHUNK_BYTES", 2 * 4 * vocab)
    assert torch.equal(heldout._row_losses(logits.bfloat16(), targets),
                       F.cross_entropy(logits.bfloat16().float(), targets, reduction="none"))
    assert heldout._row_losses(logits[:0], targets[:0]).shape == (0,)


def test_split_heldout_is_seeded_disjoint_and_ordered():
    rows = [{"input_ids": [i]} for i in range(20)]
    train, held = split_heldout(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert split_heldout(rows, 0.25, seed=3) == (train, held)
    assert split_heldout(rows, 0.25, seed=4)[1] != held
    ids = [int(h["id"].removeprefix("train-")) for h in held]
    assert ids == sorted(ids) and all(rows[i]["input_ids"] == h["input_ids"] for i, h in zip(ids, held))
    assert sorted(ids + [r["input_ids"][0] for r in train]) == list(range(20))
    assert split_heldout(rows, 0.0, 0) == (rows, [])
    with pytest.raises(ValueError, match="leaves no training example"):
        split_heldout(rows[:1], 0.6, 0)


def test_embedded_mix_holds_out_the_gsm8k_problems_it_never_trains_on(tiny, tiny_cfg):
    from plora_ray.assets.mix import gsm8k_heldout

    _, tok = tiny
    cfg = tiny_cfg(data={"train_files": ["embedded-mix-small"], "max_length": 1024})
    train_in = [{"input_ids": [1, 2], "labels": [IGNORE, 2]}] * 10
    train, held = prepare_heldout(cfg, tok, train_in)
    assert train == train_in and len(held) == 319
    assert held[0]["id"] == "gsm8k-heldout-0"
    text = tok.decode(held[5]["input_ids"])
    assert gsm8k_heldout()[5]["question"] in text and "<<" not in text
    cfg = tiny_cfg(eval={"heldout": {"files": [], "fraction": 0.2, "limit": 1}})
    train, held = prepare_heldout(cfg, tok, train_in)
    assert len(train) == 8 and len(held) == 1 and held[0]["id"].startswith("train-")


def test_checkpoint_runs_final_only_tasks_at_the_end(tiny, examples, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(run_mod, "default_items", lambda task, *_: {"arc_easy": ARC, "gsm8k": GSM}[task])
    cfg = EvalConfig(tasks=["arc_easy", "gsm8k"], final_only_tasks=["gsm8k"], max_new_tokens=4, limit=None)
    metrics, items = evaluate_checkpoint(model, tok, cfg, examples[:3], final=False)
    assert set(items) == {"heldout", "arc_easy"}
    assert {"eval/heldout/loss", "eval/heldout/loss_stderr", "eval/arc_easy/acc_norm",
            "eval/arc_easy/acc_norm_stderr"} <= set(metrics)
    assert not any(k.endswith(("/n", "/tokens")) or k.startswith("eval/gsm8k") for k in metrics)
    metrics, items = evaluate_checkpoint(model, tok, cfg, examples[:3], final=True)
    assert "eval/gsm8k/strict_stderr" in metrics and items["gsm8k"]["ids"] == ["gsm8k-0", "gsm8k-1"]
    assert not any(math.isnan(v) for v in metrics.values())
    assert evaluate_checkpoint(model, tok, EvalConfig(), None) == ({}, {})


def test_items_record_matches_the_tracking_layout(tiny, examples, monkeypatch):
    model, tok = tiny
    cfg = EvalConfig(tasks=["arc_easy", "gsm8k", "mmlu"], max_new_tokens=4, limit=None)
    items_mmlu = [dict(question="2+2?", subject="anatomy", choices=list("1234"), answer=3)]  # 1 item
    monkeypatch.setattr(run_mod, "default_items",
                        lambda task, *_: {"arc_easy": ARC, "gsm8k": GSM, "mmlu": items_mmlu}[task])
    _, items = evaluate_checkpoint(model, tok, cfg, examples[:2], final=True)
    assert items["heldout"]["ids"] == [e["id"] for e in examples[:2]]
    assert set(items["heldout"]) == {"ids", "loss", "tokens"}
    assert all(isinstance(x, float) for x in items["heldout"]["loss"])
    assert items["arc_easy"]["ids"] == ["arc-0", "arc-1", "arc-2"]
    assert set(items["arc_easy"]) == {"ids", "acc", "acc_norm"} and set(items["arc_easy"]["acc"]) <= {0, 1}
    assert items["mmlu"] == {"ids": ["mmlu-0"], "acc": items["mmlu"]["acc"], "category": ["stem"]}
    assert set(items["gsm8k"]) == {"ids", "strict", "flexible"}


@pytest.mark.parametrize("section, message", [
    ({"tasks": ["arc_easy"], "final_only_tasks": ["gsm8k"]},
     "final_only_tasks names 'gsm8k', which is not in eval.tasks"),
    ({"heldout": {"files": ["/no/such.jsonl"]}}, "field 'eval.heldout': file '/no/such.jsonl' not found"),
    ({"heldout": {"fraction": 1.0}}, "field 'eval.heldout.fraction'"),
])
def test_eval_config_errors_name_the_field(tiny_cfg, section, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(eval=section)


def test_heldout_loss_stderr_is_over_examples(tiny, examples):
    lm_eval_mean_stderr = pytest.importorskip("lm_eval.api.metrics").mean_stderr

    model, tok = tiny
    metrics, records = evaluate_heldout(model, tok, examples, batch_size=8)
    assert metrics["heldout/loss_stderr"] == pytest.approx(lm_eval_mean_stderr([r["loss"] for r in records]))
    assert math.isnan(evaluate_heldout(model, tok, examples[:1])[0]["heldout/loss_stderr"])


def test_load_examples_and_heldout_tokenise_alike(tiny):
    _, tok = tiny
    train = load_examples(["tiny-dialogues"], tok, 48)
    held = load_heldout(["tiny-dialogues"], tok, 48)
    assert [(e["input_ids"], e["labels"]) for e in held] == [(e["input_ids"], e["labels"]) for e in train]


def test_gsm8k_scores_its_whole_test_set_unless_the_run_trains_on_the_embedded_mix(tiny):
    from plora_ray.config.io import build_run_config

    own = build_run_config({"method": "lora", "eval": {"tasks": ["gsm8k"]}}, "run")
    mix = build_run_config({"method": "lora", "data": {"train_files": ["embedded-mix-small"]},
                            "eval": {"tasks": ["gsm8k"]}}, "run")
    assert (own.eval.gsm8k_items, mix.eval.gsm8k_items) == ("test", "heldout")  # recorded in config.yaml
    assert len(run_mod.default_items("gsm8k", "test")) == 1319
    assert len(run_mod.default_items("gsm8k", "heldout")) == 319
    model, tok = tiny
    for cfg, ids in ((own, ["gsm8k-test-0", "gsm8k-test-1"]), (mix, ["gsm8k-heldout-0", "gsm8k-heldout-1"])):
        ev = cfg.eval.model_copy(update={"limit": 2, "max_new_tokens": 2})
        _, items = evaluate_checkpoint(model, tok, ev, None, final=True)
        assert items["gsm8k"]["ids"] == ids  # two item sets never pair up
    # GSM8K scores problems the held-out loss does not (here it takes the first two)
    held = load_heldout(["gsm8k-heldout"], tok, 1024)[:2]
    _, items = evaluate_checkpoint(model, tok, ev, held, final=True)
    assert items["heldout"]["ids"] == ["gsm8k-heldout-0", "gsm8k-heldout-1"]
    assert items["gsm8k"]["ids"] == ["gsm8k-heldout-2", "gsm8k-heldout-3"]


def test_training_set_loss_is_the_heldout_loss_on_training_examples(tiny, examples):
    """eval.train_loss scores its examples with the held-out code: the same numbers, under
    train/ (metrics) and "train" (per-item results, for pairing across trials)."""
    model, tok = tiny
    train = [{**e, "id": f"train-{i}"} for i, e in enumerate(examples[3:6])]
    metrics, items = evaluate_checkpoint(model, tok, EvalConfig(), examples[:3], train=train)
    same, records = evaluate_heldout(model, tok, train)
    assert metrics["eval/train/loss"] == pytest.approx(same["heldout/loss"], abs=1e-6)
    assert metrics["eval/train/loss_stderr"] == pytest.approx(same["heldout/loss_stderr"], abs=1e-6)
    assert items["train"] == {"ids": ["train-0", "train-1", "train-2"], "loss": items["train"]["loss"],
                              "tokens": [r["tokens"] for r in records]}
    assert items["heldout"]["ids"] == [e["id"] for e in examples[:3]]
    metrics, items = evaluate_checkpoint(model, tok, EvalConfig(), None, train=train)
    assert set(items) == {"train"} and "eval/heldout/loss" not in metrics
