"""Conversation formats, the assistant-only loss mask, and the step plan."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plora_ray.config.names import IGNORE
from plora_ray.assets.dialogues import bundled_path, read_rows, to_messages, tokenize_dialogue
from plora_ray.run.data import StepPlan, load_examples
from plora_ray.run.models import tiny_tokenizer

DIALOGUE = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6, of course."}]
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                               "value": m["content"]} for m in DIALOGUE]}


def test_mask_covers_exactly_the_assistant_replies():
    tok = tiny_tokenizer()
    ex = tokenize_dialogue(tok, DIALOGUE, 1024)
    labelled = [i for i, label in enumerate(ex["labels"]) if label != IGNORE]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in labelled)
    text = tok.decode([ex["input_ids"][i] for i in labelled])
    assert text == "4.<|im_end|>\n6, of course.<|im_end|>\n"


def test_formats_and_file_types_give_identical_examples(tmp_path):
    tok = tiny_tokenizer()
    alpaca = {"instruction": "What is 2 + 2?", "input": "", "output": "4."}
    rows = {"messages": {"messages": DIALOGUE}, "sharegpt": SHAREGPT}
    (tmp_path / "a.jsonl").write_text(json.dumps(rows["messages"]) + "\n\n" + json.dumps(alpaca) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([rows["sharegpt"], alpaca]))
    pq.write_table(pa.Table.from_pylist([rows["messages"]]), tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([alpaca]), tmp_path / "d.parquet")
    a = load_examples([str(tmp_path / "a.jsonl")], tok, 1024)
    b = load_examples([str(tmp_path / "b.json")], tok, 1024)
    c = load_examples([str(tmp_path / "c.parquet"), str(tmp_path / "d.parquet")], tok, 1024)
    assert a == b == c and len(a) == 2
    assert to_messages(alpaca, "x")[0] == {"role": "user", "content": "What is 2 + 2?"}


def test_truncation_drops_examples_without_assistant_tokens(tmp_path):
    tok = tiny_tokenizer()
    long_q = {"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(long_q) + "\n" + json.dumps(short) + "\n")
    assert len(load_examples([str(tmp_path / "d.jsonl")], tok, 64)) == 1


def test_bundled_dialogues_load():
    rows = read_rows(bundled_path("tiny-dialogues"))
    assert len(rows) == 480
    assert len(load_examples(["tiny-dialogues"], tiny_tokenizer(), 128)) == 480


@pytest.mark.parametrize("n,micro,accum", [(50, 4, 3), (24, 8, 3), (7, 2, 2)])
def test_step_plan_uses_every_example_once_per_epoch(n, micro, accum):
    plan = StepPlan(n, micro, accum, epochs=2, seed=1)
    for e in range(2):
        flat = [i for step in plan.epoch_steps(e) for mb in step for i in mb]
        assert sorted(flat) == list(range(n))
    assert plan.epoch_steps(0) != plan.epoch_steps(1)
    assert StepPlan(n, micro, accum, epochs=2, seed=1).steps() == plan.steps()


@pytest.mark.parametrize("n,micro,accum", [(50, 4, 3), (450, 4, 2), (13, 2, 2)])
def test_length_grouped_plan_covers_each_example_once_and_groups_lengths(n, micro, accum):
    lengths = [(i * 7919) % 256 + 1 for i in range(n)]
    plan = StepPlan(n, micro, accum, epochs=2, seed=3, lengths=lengths)
    for e in range(2):
        micro_batches = [mb for step in plan.epoch_steps(e) for mb in step]
        assert sorted(i for mb in micro_batches for i in mb) == list(range(n))
        assert all(len(mb) == micro for mb in micro_batches[:-1])  # only the last may be short
    assert plan.steps() == StepPlan(n, micro, accum, epochs=2, seed=3, lengths=lengths).steps()
    assert plan.steps() != StepPlan(n, micro, accum, epochs=2, seed=4, lengths=lengths).steps()

    def padding(p):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb)
                   for step in p.steps() for mb in step)
    assert padding(plan) < padding(StepPlan(n, micro, accum, epochs=2, seed=3)) / 2

    def imbalance(p):  # longest minus shortest padded micro-batch of a step: the ranks' spread
        return sum(max(w) - min(w) for step in p.steps() if len(step) > 1 and len(step[-1]) == micro
                   for w in [[max(lengths[i] for i in mb) for mb in step]])
    if n >= 100:  # enough steps to tell (a handful of steps of 50 rows spans the lengths anyway)
        assert imbalance(plan) < imbalance(StepPlan(n, micro, accum, epochs=2, seed=3)) / 4


def test_datasets_cache_gives_the_same_examples_and_is_read_back(tmp_path, monkeypatch):
    import plora_ray.run.data as data

    tok = tiny_tokenizer()
    alpaca = {"instruction": "What is 2 + 2?", "input": "", "output": "4."}
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": DIALOGUE}) + "\n\n" + json.dumps(alpaca) + "\n"
                                      + json.dumps(SHAREGPT) + "\n")
    files = [str(tmp_path / "a.jsonl"), "tiny-dialogues"]
    plain = load_examples(files, tok, 96, cache=False)
    cached = load_examples(files, tok, 96, cache_dir=tmp_path / "cache")
    assert cached == plain and len(plain) == 3 + 480
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) >= 3  # raw rows + two tokenised files

    def no_tokenising(*args):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(data, "tokenize_dialogue", no_tokenising)
    assert load_examples(files, tok, 96, cache_dir=tmp_path / "cache") == plain  # read back
    with pytest.raises(AssertionError):  # another max_length is another cache entry
        load_examples(files, tok, 80, cache_dir=tmp_path / "cache")


def test_a_broken_file_still_names_its_line_with_the_cache_on(tmp_path):
    from plora_ray.assets.dialogues import DataError

    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": DIALOGUE}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_examples([str(tmp_path / "bad.jsonl")], tiny_tokenizer(), 96, cache_dir=tmp_path / "cache")
