"""A user's own copy of a built-in benchmark (``eval.datasets``, ``evaluate --dataset``): read
through ``datasets`` from a JSONL file, a save_to_disk folder, a parquet file or a hub-shaped
dataset folder, scored by a tiny run on exactly its items, with ids that name the set; bad copies
stop the run before anything trains, in one line naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from plora_ray.assets.copies import load_copy
from plora_ray.config.io import build_run_config, load_run_config
from plora_ray.config.schema import ConfigError
from plora_ray.evaluation.run import custom_items

GSM8K = [{"question": f"Tom has {a} apples and buys {b}. How many now?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
         for a, b in ((1, 2), (3, 4), (5, 1), (2, 2), (7, 3))]
MMLU = [{"question": f"q{i}", "subject": ("anatomy", "virology", "astronomy")[i % 3],
         "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(6)]
ARC = [{"id": f"Mercury_{i}", "question": f"Which is {i}?", "answerKey": "ABC"[i % 3],
        "choices": {"text": ["one", "two", "three"], "label": ["A", "B", "C"]}} for i in range(4)]
BASE = {"name": "copies", "method": "lora", "model": {"name_or_path": "tiny"},
        "data": {"max_length": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 1}}


@pytest.fixture
def copies(tmp_path):
    """GSM8K as JSONL, MMLU as a save_to_disk DatasetDict folder, ARC-Easy as parquet: the hub
    datasets' own columns."""
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    mmlu = tmp_path / "mmlu_saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(MMLU)}).save_to_disk(str(mmlu))
    arc = tmp_path / "arc_easy.parquet"
    datasets.Dataset.from_list(ARC).to_parquet(str(arc))
    return {"gsm8k": gsm, "mmlu": mmlu, "arc_easy": arc}


def run_yaml(tmp_path, copies, **eval_changes) -> Path:
    ev = {"tasks": list(copies), "limit": None, "max_new_tokens": 2,
          "datasets": {task: str(path) for task, path in copies.items()}, **eval_changes}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "eval": ev}))
    return path


def test_a_tiny_run_scores_every_item_of_each_copy_and_records_the_sets(tmp_path, copies):
    from plora_ray.run.loop import fit, setup

    cfg_file, out = run_yaml(tmp_path, copies), tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "plora_ray.train", str(cfg_file), "--output", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())["eval"]
    assert recorded["gsm8k_items"] == "custom"
    assert {t: c["path"] for t, c in recorded["datasets"].items()} == {t: str(p) for t, p in copies.items()}
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert {"eval/gsm8k/strict", "eval/mmlu/acc", "eval/arc_easy/acc_norm"} <= set(evals[-1])

    run = fit(setup(load_run_config(cfg_file)), progress=False)  # the same run: its per-item results
    for task, rows in (("gsm8k", GSM8K), ("mmlu", MMLU), ("arc_easy", ARC)):
        ids = run.items[task]["ids"]
        assert len(ids) == len(set(ids)) == len(rows)
        assert all(i.startswith(f"{task}-custom-") for i in ids)


def test_ids_name_the_set_by_its_content_whatever_stores_it(tmp_path, copies, monkeypatch):
    as_parquet = tmp_path / "gsm8k_test.parquet"
    datasets.Dataset.from_list(GSM8K).to_parquet(str(as_parquet))
    ids = [r["id"] for r in custom_items("gsm8k", str(copies["gsm8k"]))]
    assert ids == [r["id"] for r in custom_items("gsm8k", str(as_parquet))]  # the same set pairs
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in GSM8K[:4] + [GSM8K[0]]))
    other = [r["id"] for r in custom_items("gsm8k", str(changed))]
    assert len(other) == 5 and not set(other) & set(ids)  # a different set never pairs
    assert ids[0].rsplit("-", 1)[0] != "gsm8k-test"

    # a hub-shaped dataset folder with a configuration and a split: the path a hub id takes
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "allenai" / "ai2_arc"
    (repo / "ARC-Easy").mkdir(parents=True)
    datasets.Dataset.from_list(ARC).to_parquet(str(repo / "ARC-Easy" / "test-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Easy\n  data_files:\n  - split: test\n"
                                    "    path: ARC-Easy/test-*.parquet\n---\n")
    cfg = build_run_config({**BASE, "eval": {"tasks": ["arc_easy"], "datasets": {
        "arc_easy": {"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test"}}}})
    rows, digest = load_copy("arc_easy", **cfg.eval.datasets["arc_easy"].model_dump())
    assert [r["gold"] for r in rows] == [0, 1, 2, 0]
    assert digest == load_copy("arc_easy", str(copies["arc_easy"]))[1]


def test_the_config_says_which_gsm8k_set_is_scored(copies):
    def ev(**changes):
        return build_run_config({**BASE, "eval": {"tasks": ["gsm8k"], **changes}}).eval

    assert ev(datasets={"gsm8k": str(copies["gsm8k"])}).gsm8k_items == "custom"
    assert ev().gsm8k_items == "test"
    for changes, said in (({"gsm8k_items": "test", "datasets": {"gsm8k": str(copies["gsm8k"])}},
                           "eval.gsm8k_items test scores the bundled GSM8K"),
                          ({"gsm8k_items": "custom"}, "give it in eval.datasets.gsm8k"),
                          ({"datasets": {"mmlu": str(copies["mmlu"])}}, "eval.tasks does not score mmlu"),
                          ({"datasets": {"hellaswag": "x"}}, "'hellaswag' is not a built-in task")):
        with pytest.raises(ConfigError, match=said):
            ev(**changes)


@pytest.mark.parametrize("copy, said", [
    ("missing.jsonl", "field 'eval.datasets.gsm8k': 'missing.jsonl' not found: give an existing file"),
    ("no_answer.jsonl", "eval.datasets.gsm8k: '.*no_answer.jsonl' has no column 'answer' \\(its columns: "
                        "question, solution\\): give a copy with openai/gsm8k's columns \\(question, answer\\)"),
    ("nobody/no-such-gsm8k", "eval.datasets.gsm8k: 'nobody/no-such-gsm8k' is not a local file or folder, and "
                             "as a hub dataset it is offline"),
])
def test_a_bad_copy_stops_the_run_before_it_trains(tmp_path, copies, monkeypatch, capsys, copy, said):
    import huggingface_hub.constants
    import datasets.config

    from plora_ray.cli.train import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_answer.jsonl").write_text("".join(
        json.dumps({"question": r["question"], "solution": r["answer"]}) + "\n" for r in GSM8K))
    cfg_file = run_yaml(tmp_path, {"gsm8k": copies["gsm8k"]})
    assert main([str(cfg_file), "--output", str(tmp_path / "out"), "--set", f"eval.datasets.gsm8k={copy}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(said, err), err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_evaluate_cli_scores_a_copy_and_names_a_bad_one(tmp_path, copies, capsys):
    from plora_ray.cli.evaluate import main

    out = tmp_path / "scores.json"
    assert main(["tiny", "--tasks", "arc_easy,mmlu", "--dataset", f"arc_easy={copies['arc_easy']}",
                 "--dataset", f"mmlu={{path: {copies['mmlu']}, split: test}}", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [len(result["samples"][t]) for t in ("arc_easy", "mmlu")] == [len(ARC), len(MMLU)]
    assert all(s["id"].startswith("arc_easy-custom-") for s in result["samples"]["arc_easy"])
    assert result["datasets"]["mmlu"]["path"] == str(copies["mmlu"])
    capsys.readouterr()
    assert main(["tiny", "--tasks", "arc_easy", "--dataset", f"arc_easy={copies['gsm8k']}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dataset arc_easy: ") and "has no column 'choices'" in err
    assert len(err.splitlines()) == 1


def test_dry_run_describes_each_copy(tmp_path, copies, capsys):
    from plora_ray.cli.tune import main

    sweep = {"name": "s", "metric": "eval/gsm8k/strict", "space": {"optim.lr": {"choice": [1e-3, 2e-3]}},
             "base": {**BASE, "eval": {"tasks": ["gsm8k", "mmlu"], "limit": 3,
                                       "datasets": {"gsm8k": str(copies["gsm8k"]), "mmlu": str(copies["mmlu"])}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main([str(path), "--dry-run", "--storage", str(tmp_path / "st")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("scored at checkpoints"))
    digest = custom_items("gsm8k", str(copies["gsm8k"]))[0]["id"].split("-")[2]
    assert f"gsm8k (your copy {copies['gsm8k']}, 5 items, set custom-{digest}: the first 3)" in line
    assert f"mmlu (your copy {copies['mmlu']}, split test, 6 items, set custom-" in line
