"""Preflight: the model is checked on a meta-device skeleton (no weights, no download), every
target-module name must match, good runs pass and leave nothing behind, and a sweep whose every
trial failed is reported as a failure. The one-line refusals are tabled in test_config_errors.py
(train) and test_search_space.py (tune)."""

import pytest
import yaml

from plora_ray.config.schema import ConfigError, ModelConfig
from plora_ray.run.models import build_model, check_target_modules, model_skeleton
from plora_ray.sweep.preflight import SweepFailed, check_model, check_run, check_sweep, raise_if_every_trial_failed

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_smollm2_skeleton_is_built_from_its_known_config_without_fetching(tmp_path, monkeypatch):
    monkeypatch.setenv("PLORA_RAY_CACHE", str(tmp_path / "cache"))
    model = model_skeleton(ModelConfig(name_or_path="smollm2-135m-instruct"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # the asset's documented shape: 134.5M parameters, 30 layers, tied embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(model.model.layers) == 30 and model.lm_head.weight is model.model.embed_tokens.weight
    check_target_modules(model, ALL7)
    assert not (tmp_path / "cache").exists()  # nothing fetched or converted


def test_smollm2_known_config_gives_the_converted_asset_s_shapes_when_cached():
    from plora_ray.assets.fetch import cache_dir

    local = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (local / "config.json").exists():
        pytest.skip("the SmolLM2 asset is not cached on this machine (test_smollm2_train builds it)")
    known = model_skeleton(ModelConfig(name_or_path="smollm2-135m-instruct"))
    real = model_skeleton(ModelConfig(name_or_path=str(local)))
    assert {n: p.shape for n, p in known.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert known.config.rope_parameters == real.config.rope_parameters


def test_local_model_directory_is_checked_from_its_config_only(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path / "m")  # no weights
    model = model_skeleton(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert {p.device.type for p in model.parameters()} == {"meta"} and len(model.model.layers) == 2
    check_target_modules(model, ["q_proj", "self_attn.v_proj", "layers.1.mlp.down_proj"])  # peft's suffix match
    with pytest.raises(ConfigError, match="'wq' matches no module"):
        check_target_modules(model, ["q_proj", "wq"])


def test_full_fine_tuning_ignores_target_modules(tiny_cfg):
    check_model(tiny_cfg(method="full", lora={"target_modules": ["nonexistent_proj"]}))
    with pytest.raises(ConfigError, match="'nonexistent_proj' matches no module"):
        check_model(tiny_cfg(method="lora", lora={"target_modules": ["nonexistent_proj"]}))


def test_building_the_model_refuses_a_partly_matching_target_list(tiny_cfg):
    """The workers check too: peft alone would train q_proj and drop the typo silently."""
    with pytest.raises(ConfigError, match="'nonexistent_proj' matches no module"):
        build_model(tiny_cfg(lora={"target_modules": ["q_proj", "nonexistent_proj"]}))
    model, _ = build_model(tiny_cfg(lora={"target_modules": ["q_proj"]}))
    assert any("q_proj.lora_A" in n for n, _ in model.named_parameters())


def test_good_run_passes_and_leaves_nothing_behind(tiny_cfg, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "2+2?", "output": "4"}\n')
    cfg = tiny_cfg(data={"train_files": [str(tmp_path / "d.jsonl"), "tiny-dialogues"]})
    check_run(cfg, tmp_path / "runs" / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_resume_accepts_a_directory_that_holds_a_run(tiny_cfg, tmp_path):
    (tmp_path / "prev").mkdir()
    with pytest.raises(ConfigError, match="holds no run"):
        check_run(tiny_cfg(), tmp_path / "prev", resume=True)
    (tmp_path / "prev" / "ray_run_name").write_text("plora-run-1")
    check_run(tiny_cfg(), tmp_path / "prev", resume=True)


def test_sweep_checks_each_distinct_model_once(tmp_path, monkeypatch):
    """Twelve trials over two target lists and momentum: two skeletons built, not twelve."""
    import plora_ray.sweep.preflight as preflight
    from plora_ray.config.sweep import load_sweep

    spec = {"metric": "train/loss", "base": {"plora": {"unload_every_steps": 2}},
            "space": {"lora.target_modules": {"choice": [["q_proj"], ALL7]},
                      "plora.momentum": {"choice": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    built = []
    monkeypatch.setattr(preflight, "check_model", lambda cfg: built.append(tuple(cfg.lora.target_modules)))
    check_sweep(load_sweep(tmp_path / "s.yaml"), tmp_path / "sweeps")
    assert sorted(set(built)) == sorted({("q_proj",), tuple(ALL7)}) and len(built) == 2
    assert not (tmp_path / "sweeps").exists()


def test_sweep_whose_every_trial_failed_raises_sweep_failed(tmp_path):
    """On real Ray Tune results: all failed -> one line naming the first error; some passed -> none."""
    import ray
    from ray import tune

    def fail_when(config):  # local: Ray ships it by value (this test module is not importable there)
        if config["x"] == 1:
            raise RuntimeError("trial 1 broke")
        tune.report({"loss": float(config["x"])})

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        grid = tune.Tuner(fail_when, param_space={"x": tune.grid_search([0, 1])},
                          run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    finally:
        ray.shutdown()
    raise_if_every_trial_failed(grid, "the table")  # trial 0 succeeded: no error
    failed = [r for r in grid if r.error is not None]
    assert len(failed) == 1
    with pytest.raises(SweepFailed) as err:
        raise_if_every_trial_failed(failed, "the table")
    assert str(err.value).startswith("all 1 trial(s) failed; the first: ") and "trial 1 broke" in str(err.value)
    assert "\n" not in str(err.value) and err.value.summary == "the table"


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    """Only a key written twice in one mapping is refused; '<<: *base' then an override is YAML's
    own way to reuse a section."""
    from plora_ray.config.io import read_yaml

    (tmp_path / "r.yaml").write_text("defaults: &d {lr: 1.0e-3, eps: 1.0e-8}\noptim:\n  <<: *d\n  lr: 2.0e-3\n")
    assert read_yaml(tmp_path / "r.yaml")["optim"] == {"lr": 2e-3, "eps": 1e-8}
