"""Bad input: one line naming the field and the fix, exit code 2, no traceback, nothing lost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plora_ray.train import main

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
    ("bad-method", "method: qlora\n" + GOOD, [], "field 'method'"),
    ("bad-momentum-rule", "plora: {unload_every_steps: 2, momentum_rule: fancy}\n", [], "field 'plora.momentum_rule'"),
    ("two-unload-points", "plora: {unload_every_steps: 2, unload_every_samples: 48}\n", [], "set only one of plora.unload_every_samples"),
    ("no-unload-point", "method: plora\ndata: {max_steps: 1}\n", [], "plora.unload_every_samples"),
    ("zero-unload-point", "plora: {unload_every_samples: 0}\n", [], "field 'plora.unload_every_samples'"),
    ("betas", "optim: {betas: [0.9, 1.5]}\n" + GOOD, [], "optim.betas"),
    ("empty-targets", "lora: {target_modules: []}\n" + GOOD, [], "field 'lora.target_modules'"),
    ("dropout-one", "lora: {dropout: 1.0}\n" + GOOD, [], "field 'lora.dropout'"),
    ("bad-dtype", "model: {dtype: float16}\n" + GOOD, [], "field 'model.dtype'"),
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
