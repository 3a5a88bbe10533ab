"""Training data through ``datasets``: files of every format, save_to_disk folders, dataset
folders (the code path a hub id takes), column maps, row caps and mixes; a tiny run trains on a
prompt/completion file through a column map."""

import json

import datasets
import pytest

from plora_ray.assets.dialogues import DataError
from plora_ray.assets.sources import check_data
from plora_ray.config.data import DataConfig, SourceConfig
from plora_ray.run.data import load_examples
from plora_ray.run.models import tiny_tokenizer

QA = [{"question": f"What is {a} + {b}?", "answer": f"{a + b}.", "topic": "sums"} for a in range(3) for b in range(2)]


def as_messages(rows):
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def reference(tmp_path, tok):
    """The examples of QA written as messages rows: what every mapped source must give."""
    return load_examples([str(write_jsonl(tmp_path / "ref.jsonl", as_messages(QA)))], tok, 128, cache=False)


QA_MAP = {"prompt": "question", "completion": "answer"}


def test_prompt_completion_through_a_column_map_equals_messages(tmp_path, tok, reference):
    f = write_jsonl(tmp_path / "qa.jsonl", QA)
    src = SourceConfig(path=str(f), columns=QA_MAP)
    assert load_examples([src], tok, 128, cache_dir=tmp_path / "c") == reference
    assert load_examples([src], tok, 128, cache_dir=tmp_path / "c") == reference  # read back from the cache
    # the same rows under the loader's own names need no map
    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in QA])
    assert load_examples([str(plain)], tok, 128, cache=False) == reference


@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow"])
def test_other_file_formats_load_through_datasets(tmp_path, tok, reference, fmt):
    ds = datasets.Dataset.from_list(QA)
    f = tmp_path / f"qa.{fmt}"
    {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False), "arrow": _write_arrow(ds)}[fmt](str(f))
    assert load_examples([SourceConfig(path=str(f), columns=QA_MAP)], tok, 128, cache_dir=tmp_path / "c") == reference


def _write_arrow(ds):
    """An Arrow IPC stream file, as datasets writes its own."""
    import pyarrow as pa

    def write(path):
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    return write


def test_save_to_disk_folders_with_a_split(tmp_path, tok, reference):
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA),
                          "test": datasets.Dataset.from_list(QA[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert load_examples([SourceConfig(path=str(tmp_path / "one"), columns=QA_MAP)], tok, 128,
                         cache_dir=tmp_path / "c") == reference
    assert load_examples([SourceConfig(path=str(tmp_path / "dict"), columns=QA_MAP)], tok, 128,
                         cache_dir=tmp_path / "c") == reference
    assert len(load_examples([SourceConfig(path=str(tmp_path / "dict"), split="test", columns=QA_MAP)], tok, 128,
                             cache_dir=tmp_path / "c")) == 1
    with pytest.raises(DataError, match=r"data.sources\[0\].split: 'validation' not in .* \(splits: train, test\)"):
        load_examples([SourceConfig(path=str(tmp_path / "dict"), split="validation", columns=QA_MAP)], tok, 128,
                      cache_dir=tmp_path / "c")


def test_a_dataset_folder_loads_by_path_with_name_split_and_data_files(tmp_path, tok, reference):
    """load_dataset(folder, ...): the call a hub id gets, on a local repository-shaped folder."""
    repo = tmp_path / "org-data"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", QA)
    write_jsonl(repo / "data" / "test.jsonl", QA[:2])
    write_jsonl(repo / "other.jsonl", QA[:3])
    assert load_examples([SourceConfig(path=str(repo), columns=QA_MAP, data_files={"train": "data/train.jsonl",
                                                                                  "test": "data/test.jsonl"})],
                         tok, 128, cache_dir=tmp_path / "c") == reference
    assert len(load_examples([SourceConfig(path=str(repo), split="test", columns=QA_MAP,
                                           data_files={"train": "data/train.jsonl", "test": "data/test.jsonl"})],
                             tok, 128, cache_dir=tmp_path / "c")) == 2
    assert len(load_examples([SourceConfig(path=str(repo), data_files="other.jsonl", columns=QA_MAP)], tok, 128,
                             cache_dir=tmp_path / "c")) == 3


def test_two_sources_mix_in_order_with_caps(tmp_path, tok, reference):
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    sources = [SourceConfig(path=str(qa), columns=QA_MAP, max_rows=2), SourceConfig(path="tiny-dialogues", max_rows=3)]
    mixed = load_examples(sources, tok, 128, cache_dir=tmp_path / "c")
    tiny = load_examples(["tiny-dialogues"], tok, 128, cache=False)[:3]
    assert mixed == reference[:2] + tiny
    # a mapped column replaces a row field the source already has; unmapped columns are dropped
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "ignored", "q": r["question"], "completion": r["answer"]}
                                                   for r in QA])
    assert load_examples([SourceConfig(path=str(clash), columns={"prompt": "q"})], tok, 128,
                         cache_dir=tmp_path / "c") == reference


def test_system_column_becomes_the_system_message(tmp_path, tok):
    rows = [{"q": "Hi?", "a": "Hello.", "sys": "Be brief."}]
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    got = load_examples([SourceConfig(path=str(f), columns={"prompt": "q", "completion": "a", "system": "sys"})], tok,
                        128, cache_dir=tmp_path / "c")
    want = load_examples([str(write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]}]))], tok, 128, cache=False)
    assert got == want


def test_check_data_reads_sources_as_training_will(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", QA)
    check_data(DataConfig(sources=[SourceConfig(path=str(f), columns=QA_MAP)]), tmp_path / "c")
    with pytest.raises(DataError, match=r"qa.jsonl\[0\]: unknown row format"):
        check_data(DataConfig(sources=[SourceConfig(path=str(f), columns={"prompt": "question"})]), tmp_path / "c")
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"data.sources\[1\].columns.prompt: column 'q' is not in"):
        check_data(DataConfig(sources=[SourceConfig(path=str(f), columns=QA_MAP),
                                       SourceConfig(path=str(tmp_path / "saved"), columns={"prompt": "q"})]),
                   tmp_path / "c")


def test_a_run_trains_on_prompt_completion_rows_through_a_column_map(tmp_path, monkeypatch):
    from plora_ray.cli.train import main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "qa.jsonl", QA * 4)
    (tmp_path / "run.yaml").write_text(
        "plora: {unload_every_steps: 2}\n"
        "data: {max_steps: 3, max_length: 64, micro_batch_size: 2, gradient_accumulation_steps: 1,\n"
        "       sources: [{path: qa.jsonl, columns: {prompt: question, completion: answer}, max_rows: 10},\n"
        "                 {path: tiny-dialogues, max_rows: 4}]}\n")
    assert main(["run.yaml", "--output", "out", "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["unloads"] == 1
    assert (tmp_path / "cache" / "raw").is_dir()  # the file went through datasets


def test_multiple_choice_rows_and_a_where_filter(tmp_path, tok):
    """ARC's shape ({text, label} choices, a letter or digit answerKey) and MMLU's (a list and an
    index) give the embedded mix's dialogue; ``where`` keeps the rows of one subset."""
    from plora_ray.assets.dialogues import to_messages
    from plora_ray.assets.mix import format_multiple_choice, multiple_choice_answer

    arc = [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
            "answerKey": "B", "subset": "easy"},
           {"question": "Which is warm?", "choices": {"text": ["snow", "sun"], "label": ["1", "2"]},
            "answerKey": "2", "subset": "hard"}]
    f = write_jsonl(tmp_path / "arc.jsonl", arc)
    src = SourceConfig(path=str(f), columns={"answer": "answerKey"}, where={"subset": ["easy"]})
    got = load_examples([src], tok, 256, cache_dir=tmp_path / "c")
    want = [{"role": "user", "content": format_multiple_choice("Which is a gas?", ["ice", "steam", "rock"])},
            {"role": "assistant", "content": multiple_choice_answer(["ice", "steam", "rock"], 1)}]
    assert want[1]["content"].startswith("The answer is B.")
    ref = load_examples([str(write_jsonl(tmp_path / "m.jsonl", [{"messages": want}]))], tok, 256, cache=False)
    assert got == ref
    row = {"question": "Which is warm?", "choices": {"text": ["snow", "sun"], "label": ["1", "2"]}, "answer": "2"}
    assert to_messages(row, "x")[1]["content"] == multiple_choice_answer(["snow", "sun"], 1)
    assert to_messages({"question": "q", "choices": ["a", "b"], "answer": 0}, "x")[1]["content"] == \
        multiple_choice_answer(["a", "b"], 0)
    with pytest.raises(DataError, match="answer 'E' names none of the 2 choices"):
        to_messages({"question": "q", "choices": ["a", "b"], "answer": "E"}, "x")
    with pytest.raises(DataError, match=r"data.sources\[0\].where.subset: no row of .* has subset in \['medium'\] \(its values: easy, hard\)"):
        load_examples([SourceConfig(path=str(f), columns={"answer": "answerKey"}, where={"subset": ["medium"]})],
                      tok, 256, cache_dir=tmp_path / "c")


def _repo(root, name, configs: dict[str, dict[str, list[dict]]]):
    """A hub-shaped dataset folder: parquet files per config and split, declared in the README's
    YAML ``configs`` as the hub's datasets do (openai/gsm8k: main; allenai/ai2_arc: ARC-Easy...)."""
    repo = root / name
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (repo / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
    (repo / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_the_paper_sweeps_dry_run_describes_the_mix_template_and_full_test_sets(tmp_path, monkeypatch, capsys):
    """search_spaces/paper/rank.yaml as shipped, with local stand-ins of its hub datasets (the same
    load_dataset calls) and of LLaMA-7B (the tiny model saved): --dry-run reads every source,
    and says what trains and what is scored."""
    import huggingface_hub.constants
    from pathlib import Path

    import datasets.config

    from plora_ray.cli.tune import main
    from plora_ray.run.models import tiny_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    tulu = [{"dataset": d, "id": f"{d}_{k}", "messages": chat} for d in ("open_orca", "code_alpaca", "sharegpt")
            for k in range(2)]
    _repo(tmp_path, "allenai/tulu-v2-sft-mixture", {"default": {"train": tulu}})
    _repo(tmp_path, "openai/gsm8k", {"main": {"train": [{"question": "1 + 1?", "answer": "2\n#### 2"}]}})
    arc = [{"id": "a", "question": "Gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}]
    _repo(tmp_path, "allenai/ai2_arc", {"ARC-Easy": {"train": arc}, "ARC-Challenge": {"train": arc}})
    from plora_ray.config.schema import ModelConfig

    model_dir = tmp_path / "llama"
    tiny_model(ModelConfig(), len(tok_ := tiny_tokenizer()), 0).save_pretrained(model_dir)
    tok_.save_pretrained(model_dir)
    assert main([str(root / "search_spaces" / "paper" / "rank.yaml"), "--dry-run", "--storage", "s",
                 "--set", f"base.model.name_or_path={model_dir}"]) == 0
    out = capsys.readouterr().out
    assert ("trains on (first trial): allenai/tulu-v2-sft-mixture (where {dataset: [open_orca, code_alpaca]}) + "
            "openai/gsm8k (name main; columns question->prompt, answer->completion) + allenai/ai2_arc (name "
            "ARC-Easy; columns answerKey->answer) + allenai/ai2_arc (name ARC-Challenge; columns answerKey->answer); "
            "chat template vicuna_v1.1; max_length 2048") in out
    assert ("gsm8k (GSM8K's test set, 1,319 problems: all items); mmlu (test set: all items); arc_easy (test set: "
            "all items); arc_challenge (test set: all items)") in out
    assert "last checkpoint only" not in out
    # a wrong subset value is caught by the same dry run, naming the values there are
    assert main([str(root / "search_spaces" / "paper" / "rank.yaml"), "--dry-run", "--storage", "s",
                 "--set", f"base.model.name_or_path={model_dir}",
                 "--set", "base.data.sources=[{path: allenai/tulu-v2-sft-mixture, where: {dataset: [orca]}}]"]) == 2
    assert "data.sources[0].where.dataset: no row of allenai/tulu-v2-sft-mixture has dataset in ['orca'] (its " \
        "values: code_alpaca, open_orca, sharegpt)" in capsys.readouterr().err


def test_examples_are_arrow_memory_mapped_from_the_cache(tmp_path, tok):
    """A worker's examples are the datasets cache file's Arrow buffers plus a row index: loading
    them again allocates almost nothing, and the held-out split copies no data."""
    import pyarrow as pa

    from plora_ray.evaluation.heldout import split_heldout
    from plora_ray.run.data import Examples

    f = write_jsonl(tmp_path / "qa.jsonl", QA * 200)
    first = load_examples([SourceConfig(path=str(f), columns=QA_MAP)], tok, 128, cache_dir=tmp_path / "c")
    before = pa.total_allocated_bytes()
    again = load_examples([SourceConfig(path=str(f), columns=QA_MAP)], tok, 128, cache_dir=tmp_path / "c")
    grown = pa.total_allocated_bytes() - before
    assert isinstance(again, Examples) and len(again) == 1200 and again == first
    assert grown < again.table.nbytes / 10, (grown, again.table.nbytes)
    train, held = split_heldout(again, 0.25, seed=1)
    assert isinstance(train, Examples) and train.table is again.table and len(train) + len(held) == 1200
    assert train.lengths() == [len(e["input_ids"]) for e in train]


def test_a_sources_config_survives_its_trip_to_the_workers():
    """The run config is dumped whole (default train_files included) and validated again on
    every worker: that must not read as giving both forms."""
    from plora_ray.config.io import build_run_config
    from plora_ray.config.schema import RunConfig

    cfg = build_run_config({"name": "x", "method": "lora", "data": {"sources": [{"path": "tiny-dialogues"}]}})
    assert RunConfig.model_validate(cfg.model_dump()).data.all_sources() == cfg.data.all_sources()
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg
