"""``model.compile``: the decoder layers compiled for the training steps (regional torch.compile)
train as the eager model does, to fp32 rounding, and PLoRA's unloads stay exact through them
(the parameters the graphs read are the ones unloads write)."""

import pytest
import torch

from plora_ray.config.schema import ConfigError
from plora_ray.run.loop import fit, setup
from plora_ray.sweep.preflight import check_model


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


def test_code_for_two_vector_isas_is_cached_apart_and_each_matches_eager(tiny_cfg, monkeypatch):
    """Inductor's graph cache key (torch 2.13) omits the CPU vector ISA it generated code for:
    a graph cached under AVX-512 and loaded under AVX2 gave NaN (the loops of one ISA over the
    vectors of another). Each ISA gets its own cache folder, so a second ISA on one cache root
    (``ATEN_CPU_CAPABILITY``, or nodes of two CPU kinds sharing ``PLORA_RAY_CACHE``) compiles
    its own code, which matches eager as the first ISA's does."""
    import os

    import torch._dynamo
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    native = str(pick_vec_isa())
    if native == "INVALID_VEC_ISA":
        pytest.skip("Inductor generates no vectorized CPU code here")
    cfg = tiny_cfg(seed=0)
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))

    def logits(run):
        torch.manual_seed(1)  # non-zero LoRA B factors, the same in every run: the adapters count
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        with torch.no_grad():
            return run.model(ids).logits

    reference = logits(setup(cfg))
    compiled_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": True})})
    folders = []
    for capability in (None, "default" if native == "avx2" else "avx2"):
        if capability:  # Inductor now generates another ISA's code (ATen's own kernels are chosen once)
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        torch._dynamo.reset()  # compile again, through Inductor's on-disk caches
        out = logits(setup(compiled_cfg))
        folders.append(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert torch.isfinite(out).all(), capability
        assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5), (capability, (out - reference).abs().max())
    assert folders[0] != folders[1], folders
