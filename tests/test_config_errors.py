"""Bad input: one line naming the field and the fix, exit code 2, no traceback, nothing lost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plora_ray.cli.train import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, max_length: 64}\n"

CASES = [
    # (id, yaml text, extra argv, expected fragment of the message)
    ("unknown-top-key", "metod: plora\n" + GOOD, [], "unknown key 'metod': did you mean 'method'"),
    ("unknown-nested-key", "lora: {rnk: 4}\n" + GOOD, [], "unknown key 'lora.rnk': did you mean 'lora.rank'"),
    ("wrong-type", "lora: {rank: eight}\n" + GOOD, [], "field 'lora.rank'"),
    ("momentum-one", "plora: {unload_every_steps: 2, momentum: 1.0}\n", [], "field 'plora.momentum': Input should be less than 1"),
    ("momentum-negative", "plora: {unload_every_steps: 2, momentum: -0.1}\n", [], "field 'plora.momentum'"),
    ("rank-zero", "lora: {rank: 0}\n" + GOOD, [], "field 'lora.rank': Input should be greater than or equal to 1"),
    ("negative-lr", "optim: {lr: -1.0e-4}\n" + GOOD, [], "field 'optim.lr'"),
    ("infinite-lr", "optim: {lr: .inf}\n" + GOOD, [], "field 'optim.lr': Input should be a finite number"),
    ("nan-alpha", "lora: {alpha: .nan}\n" + GOOD, [], "field 'lora.alpha': Input should be a finite number"),
    ("a-sweep-file", "name: s\nbase: {method: lora}\nmetric: train/loss\n", [],
     "a sweep file (it has a 'base'), not a run config: run it with python -m plora_ray.tune run.yaml"),
    ("bad-method", "method: qlora\n" + GOOD, [], "field 'method'"),
    ("bad-momentum-rule", "plora: {unload_every_steps: 2, momentum_rule: fancy}\n", [], "field 'plora.momentum_rule'"),
    ("two-unload-points", "plora: {unload_every_steps: 2, unload_every_samples: 48}\n", [], "set only one of plora.unload_every_samples"),
    ("no-unload-point", "method: plora\ndata: {max_steps: 1}\n", [], "plora.unload_every_samples"),
    ("zero-unload-point", "plora: {unload_every_samples: 0}\n", [], "field 'plora.unload_every_samples'"),
    ("betas", "optim: {betas: [0.9, 1.5]}\n" + GOOD, [], "optim.betas"),
    ("empty-targets", "lora: {target_modules: []}\n" + GOOD, [], "field 'lora.target_modules'"),
    ("dropout-one", "lora: {dropout: 1.0}\n" + GOOD, [], "field 'lora.dropout'"),
    ("bad-dtype", "model: {dtype: float16}\n" + GOOD, [], "field 'model.dtype'"),
    ("compile-with-deepspeed", "model: {compile: true}\ndistributed: {engine: deepspeed, zero_stage: 2}\n" + GOOD, [],
     "model.compile is tested with distributed.engine ddp and no gradient checkpointing only"),
    ("micro-batch-zero", "data: {micro_batch_size: 0}\nplora: {unload_every_steps: 2}\n", [], "field 'data.micro_batch_size'"),
    ("missing-data-file", "data: {train_files: [nope.jsonl]}\nplora: {unload_every_steps: 2}\n", [], "file 'nope.jsonl' not found"),
    ("missing-model-dir", "model: {name_or_path: ./no/such/model}\n" + GOOD, [], "field 'model.name_or_path'"),
    ("unknown-target-module", "lora: {target_modules: [qq_proj]}\n" + GOOD, [], "field 'lora.target_modules'"),
    ("yaml-syntax", "lora: {rank: 4\n", [], "not valid YAML"),
    ("top-level-list", "- a\n- b\n", [], "top level must be a mapping"),
    ("bad-override", GOOD, ["--set", "lora.rank"], "must look like key=value"),
    ("override-out-of-range", GOOD, ["--set", "plora.momentum=2"], "field 'plora.momentum'"),
    ("override-unknown", GOOD, ["--set", "optim.learning_rate=1e-3"], "did you mean 'optim.lr'"),
]


@pytest.mark.parametrize("case_id,text,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_config_gives_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case_id, text, argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(text)
    code = main(["run.yaml", "--output", "out", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_config_file(capsys, tmp_path):
    assert main([str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err


@pytest.mark.parametrize("content,fragment", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n', ":2: invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "x"}\n', ":2: unknown row format"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: no assistant message"),
    ('{"conversations": [{"from": "alien", "value": "hi"}]}\n', ":1: conversations[0] has unknown speaker"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n', "role 'robot'"),
])
def test_malformed_data_row_names_file_and_line(tmp_path, capsys, monkeypatch, content, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(content)
    (tmp_path / "run.yaml").write_text("data: {train_files: [d.jsonl], max_steps: 1}\nplora: {unload_every_steps: 2}\n")
    assert main(["run.yaml", "--output", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "d.jsonl" in err and fragment in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_prints_no_traceback(tmp_path):
    (tmp_path / "run.yaml").write_text("plora: {unload_every_steps: 2, momentum: 1.5}\n")
    proc = subprocess.run([sys.executable, "-m", "plora_ray.train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "plora.momentum" in proc.stderr


def test_existing_run_is_never_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(GOOD)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text(json.dumps({"keep": True}))
    assert main(["run.yaml", "--output", "out"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"keep": True}
    assert (tmp_path / "out-2" / "summary.json").exists()


# ---------------------------------------------------------------------------- preflight
# Inputs the schema alone cannot see: checked by plora_ray.sweep.preflight before any work starts.
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
RUN = "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, max_length: 64, train_files: [d.jsonl]}\n"
PREFLIGHT = [
    # (id, run.yaml text or bytes, other files {name: text | bytes | None (a directory)}, argv, fragment)
    ("yaml-binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", {}, [], "run.yaml: not a text YAML file (byte 0x89"),
    ("yaml-latin1", "name: caf\xe9\n".encode("latin-1") + GOOD.encode(), {}, [], "run.yaml: not a text YAML file"),
    ("yaml-nul-bytes", GOOD + "\x00\x00\n", {}, [], "run.yaml: not a text YAML file (it holds NUL bytes)"),
    ("yaml-duplicate-top-key", "lora: {rank: 4}\nlora: {rank: 8}\n" + GOOD, {}, [], "run.yaml line 2: key 'lora' is given twice"),
    ("yaml-duplicate-nested-key", "lora:\n  rank: 4\n  alpha: 8\n  rank: 16\n" + GOOD, {}, [], "run.yaml line 4: key 'rank' is given twice"),
    ("yaml-duplicate-flow-key", "optim: {lr: 1.0e-3, lr: 1.0e-4}\n" + GOOD, {}, [], "key 'lr' is given twice in the same mapping"),
    ("seed-above-64-bit", "seed: 18446744073709551616\n" + GOOD, {}, [], "field 'seed': Input should be less than or equal to 18446744073709551615"),
    ("seed-negative", "seed: -1\n" + GOOD, {}, [], "field 'seed': Input should be greater than or equal to 0"),
    ("target-one-of-two-missing", "lora: {target_modules: [q_proj, nonexistent_proj]}\n" + GOOD, {}, [],
     "field 'lora.target_modules': 'nonexistent_proj' matches no module of the model"),
    ("target-typo-beside-valid", "lora: {target_modules: [q_proj, v_prj]}\n" + GOOD, {}, [], "'v_prj' matches no module of the model (did you mean 'v_proj'?)"),
    ("target-not-a-layer", "lora: {target_modules: [self_attn]}\n" + GOOD, {}, [], "'self_attn' names LlamaAttention modules, which LoRA cannot adapt"),
    ("tiny-heads-indivisible", "model: {tiny: {hidden_size: 66}}\n" + GOOD, {}, [], "field 'model.tiny': hidden_size must divide"),
    ("model-hub-id-offline", "model: {name_or_path: no-such-org/no-such-model}\n" + GOOD, {}, [],
     "field 'model.name_or_path': 'no-such-org/no-such-model' is not a local directory and not in the hub cache (HF_HUB_OFFLINE is set)"),
    ("model-dir-without-config", "model: {name_or_path: ./empty_model}\n" + GOOD, {"empty_model": None}, [],
     "field 'model.name_or_path': './empty_model' is not a model directory"),
    ("model-dir-without-tokenizer", "model: {name_or_path: ./cfg_only}\n" + GOOD, {"cfg_only": None, "cfg_only/config.json": (
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, '
        '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}')}, [],
     "field 'model.name_or_path': './cfg_only' has no tokenizer that loads"),
    ("template-does-not-render", "model: {chat_template: '{{ messages[0].nope() }}'}\n" + GOOD, {}, [],
     "field 'model.chat_template': the template does not render a dialogue (UndefinedError"),
    ("template-drops-replies", "model: {chat_template: '{% for m in messages %}{{ m.role }}: {% endfor %}'}\n" + GOOD,
     {}, [], "field 'model.chat_template': the template does not write the assistant's replies"),
    ("data-binary", RUN, {"d.jsonl": b"\x1f\x8b\x08\x00\xff\xfe binary"}, [], "d.jsonl: not UTF-8 text (byte 0x8b at offset 1)"),
    ("data-nul-bytes", RUN, {"d.jsonl": CHAT + "\x00\x00\x00"}, [], "d.jsonl: binary content (NUL bytes)"),
    ("data-empty", RUN, {"d.jsonl": ""}, [], "d.jsonl: the file holds no rows"),
    ("data-blank-lines-only", RUN, {"d.jsonl": "\n  \n\n"}, [], "d.jsonl: the file holds no rows"),
    ("data-empty-json-array", RUN.replace("d.jsonl", "d.json"), {"d.json": "[]"}, [], "d.json: the file holds no rows"),
    ("data-garbage-parquet", RUN.replace("d.jsonl", "d.parquet"), {"d.parquet": b"PAR1 not really"}, [], "d.parquet: not a readable parquet file"),
    ("data-directory", RUN.replace("d.jsonl", "dd"), {"dd": None}, [], "dd: is a directory"),
    ("data-second-file-no-assistant", RUN.replace("[d.jsonl]", "[d.jsonl, e.jsonl]"),
     {"d.jsonl": CHAT, "e.jsonl": CHAT + '{"messages": [{"role": "user", "content": "hi"}]}\n'}, [], "e.jsonl:2: no assistant message"),
    ("source-missing-column", "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, sources: [{path: q.jsonl, "
     "columns: {prompt: question, completion: answr}}]}\n", {"q.jsonl": '{"question": "hi", "answer": "yo"}\n'}, [],
     "data.sources[0].columns.completion: column 'answr' is not in q.jsonl (its columns: answer, question)"),
    ("source-unmapped-shape", "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, sources: [{path: q.jsonl}]}\n",
     {"q.jsonl": '{"question": "hi", "answer": "yo"}\n'}, [], "q.jsonl:1: unknown row format (keys ['answer', 'question'])"),
    ("source-hub-id-offline", "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, sources: [{path: no-org/no-data}]}\n",
     {}, [], "data.sources[0].path: 'no-org/no-data' is not a local file or folder, and as a hub dataset it is offline"),
    ("source-local-missing", "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, sources: [{path: ./nowhere.jsonl}]}\n",
     {}, [], "field 'data.sources[0].path': './nowhere.jsonl' not found"),
    ("source-and-train-files", "plora: {unload_every_steps: 2}\ndata: {train_files: [d.jsonl], sources: [{path: d.jsonl}]}\n",
     {"d.jsonl": CHAT}, [], "give data.sources or data.train_files, not both"),
    ("source-unknown-row-field", "plora: {unload_every_steps: 2}\ndata: {sources: [{path: d.jsonl, columns: {reply: a}}]}\n",
     {"d.jsonl": CHAT}, [], "data.sources.0.columns"),
    ("output-is-a-file", GOOD, {"out.txt": "keep me"}, ["--output", "out.txt"], "output directory '"),
    ("output-under-a-file", GOOD, {"out.txt": "keep me"}, ["--output", "out.txt/run"], "cannot be created: '"),
    ("output-not-writable", GOOD, {}, ["--output", "/proc/plora-ray-no-such/run"], "is not writable"),
    ("config-output-dir-is-a-file", "output_dir: out.txt\n" + GOOD, {"out.txt": "keep me"}, ["--set", "seed=1"], "out.txt' is a file, not a directory"),
    ("storage-path-is-a-file", "distributed: {storage_path: out.txt}\n" + GOOD, {"out.txt": "keep me"}, ["--output", "out"],
     "field 'distributed.storage_path': '"),
    ("resume-empty-dir", GOOD, {"prev": None}, ["--resume", "--output", "prev"], "--resume: 'prev' holds no run to continue"),
    ("resume-missing-dir", GOOD, {}, ["--resume", "--output", "nowhere"], "--resume: 'nowhere' holds no run to continue"),
    ("resume-dir-without-run", GOOD, {"prev": None, "prev/notes.txt": "mine"}, ["--resume", "--output", "prev"],
     "drop --resume"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("case_id,text,files,argv,fragment", PREFLIGHT, ids=[c[0] for c in PREFLIGHT])
def test_preflight_refuses_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case_id, text, files,
                                                            argv, fragment):
    import huggingface_hub.constants

    import datasets.config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    for name, content in files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(tmp_path)
    code = main(["run.yaml", *(argv or ["--output", "out"])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _snapshot(tmp_path) == before  # no output directory, no file changed


def test_cli_preflight_failure_is_one_line_without_traceback(tmp_path):
    (tmp_path / "run.yaml").write_text("lora: {target_modules: [q_proj, nonexistent_proj]}\n" + GOOD)
    proc = subprocess.run([sys.executable, "-m", "plora_ray.train", "run.yaml", "--output", "out"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nonexistent_proj" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
