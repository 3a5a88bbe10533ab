"""``model.compile``: the decoder layers compiled for the training steps (regional torch.compile)
train as the eager model does, to fp32 rounding, and PLoRA's unloads stay exact through them
(the parameters the graphs read are the ones unloads write)."""

import pytest
import torch

from plora_ray.config.schema import ConfigError
from plora_ray.run.loop import fit, setup
from plora_ray.sweep.preflight import check_model


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX2",
                    reason="refused on an AVX2 CPU (compiled LoRA layers gave NaN there): tested below")
def test_compiled_layers_train_like_eager_and_unloads_stay_exact(tiny_cfg, tmp_path):
    from torch._dynamo.utils import counters

    cfg = tiny_cfg(seed=0, optim={"lr": 1e-2}, data={"max_steps": 6},
                   plora={"unload_every_steps": 2, "momentum": 0.1, "measure_output_change": True})
    eager = fit(setup(cfg), progress=False)
    compiled_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": True})})
    run = setup(compiled_cfg)
    layers = run.model.get_base_model().model.layers
    assert len(layers) >= 2 and all(layer._compiled_call_impl is not None for layer in layers)
    graphs = counters["stats"]["unique_graphs"]
    fit(run, progress=False)
    assert counters["stats"]["unique_graphs"] > graphs  # the steps really ran compiled graphs
    assert [e.step for e in run.unloads] == [e.step for e in eager.unloads] == [2, 4, 6]
    for e in run.unloads:  # the preserve rule through compiled layers: outputs unchanged
        assert e.output_change < 1e-5
    # measured 2026-12-06 (Xeon, fp32): weights (LoRA factors included) within 1.6e-5 relative
    for a, b in zip(run.history, eager.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
    worst = 0.0
    for (name, p), q in zip(run.model.state_dict().items(), eager.model.state_dict().values()):
        worst = max(worst, ((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-12)).item())
    print(f"compiled vs eager after 6 steps, 3 unloads: worst relative weight difference {worst:.1e}")
    assert worst < 1e-4
    # its checkpoint is rebuilt uncompiled (export, evaluate: saved or scored, not trained) with
    # the same weights
    from plora_ray.run.rundir import restore_run, save_run_checkpoint

    save_run_checkpoint(run, tmp_path / "checkpoint")
    restored = restore_run(tmp_path / "checkpoint")
    assert all(layer._compiled_call_impl is None for layer in restored.model.get_base_model().model.layers)
    assert restored.cfg.model.compile is True  # the run's own config is what its outputs record
    for (name, p), q in zip(run.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_compiling_a_model_that_names_no_decoder_layer_is_refused_before_it_loads(tiny_cfg, monkeypatch):
    """The refusal comes from preflight's meta-device skeleton (no weight read), before any run
    or sweep starts; the run's own setup refuses it in the same words."""
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # any CPU compile runs on
    cfg = tiny_cfg(model={"compile": True})
    check_model(cfg)  # the tiny Llama names its decoder layers
    # an architecture that names none (transformers gathers them from the model's parts)
    monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", None)
    with pytest.raises(ConfigError, match=r"^model.compile: tiny names no repeated decoder layer .*"
                                          r"set model.compile: false$"):
        check_model(cfg)
    with pytest.raises(ConfigError, match="^model.compile: tiny names no repeated decoder layer"):
        setup(cfg)


def test_compiling_lora_layers_is_refused_on_an_avx2_cpu_before_anything_loads(tiny_cfg, monkeypatch):
    """There torch 2.13's compiled LoRA layers gave NaN in the first forward pass (seen with
    ATEN_CPU_CAPABILITY=avx2; full fine-tuning's layers matched eager): refused in one line by
    preflight and by the run's own setup; full fine-tuning and GPU runs are not refused."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cfg = tiny_cfg(model={"compile": True})
    for check in (check_model, setup):
        with pytest.raises(ConfigError, match=r"^model.compile: torch .* NaN on this CPU \(ATen capability AVX2.*"
                                              r"set model.compile: false$"):
            check(cfg)
    check_model(tiny_cfg(method="full", model={"compile": True}))
    check_model(tiny_cfg(model={"compile": False}))
