"""model.dtype auto: bf16 only where bf16 matmuls are fast; a slow bf16 CPU run says so."""

import pytest

import plora_ray.config.hardware as config
from plora_ray.config.io import build_run_config


@pytest.mark.parametrize("fast,use_gpu,expect", [(True, False, "bfloat16"), (False, False, "float32"),
                                                 (False, True, "bfloat16")])
def test_auto_dtype_is_resolved_when_the_config_is_built(monkeypatch, fast, use_gpu, expect):
    monkeypatch.setattr(config, "fast_bf16_cpu", lambda: fast)
    cfg = build_run_config({"model": {"dtype": "auto"}, "distributed": {"use_gpu": use_gpu},
                            "plora": {"unload_every_steps": 2}})
    assert cfg.model.dtype == expect
    # the resolved value is what a trial's or a resumed run's config carries
    assert build_run_config(cfg.model_dump()).model.dtype == expect


def test_this_cpus_answer_matches_its_bf16_path():
    import torch

    assert config.fast_bf16_cpu() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert config.auto_dtype(False) == ("bfloat16" if config.fast_bf16_cpu() else "float32")


def test_bf16_on_a_slow_bf16_cpu_warns_in_one_line(monkeypatch, tiny_cfg, capsys):
    from plora_ray.run.loop import setup

    monkeypatch.setattr(config, "fast_bf16_cpu", lambda: False)
    setup(tiny_cfg(model={"dtype": "bfloat16"}, data={"max_steps": 1}))
    err = [line for line in capsys.readouterr().err.splitlines() if "model.dtype" in line]
    assert len(err) == 1 and err[0].startswith("warning: field 'model.dtype' bfloat16") and "auto" in err[0]
    monkeypatch.setattr(config, "fast_bf16_cpu", lambda: True)
    setup(tiny_cfg(model={"dtype": "bfloat16"}, data={"max_steps": 1}))
    assert "model.dtype" not in capsys.readouterr().err
