"""Memory controls and the user's DeepSpeed JSON.

* gradient checkpointing and the attention implementation change no loss or gradient beyond
  float rounding and keep PLoRA's unloads exact: one process, then two gloo workers (no Ray, as
  tests/test_replicas.py) under DDP, ZeRO-2 with the optimizer offloaded to the CPU, and ZeRO-3
  driven by a user's DeepSpeed JSON (examples/deepspeed_zero3.json), each against the one-process
  run without checkpointing;
* ZeRO-3 builds the model partitioned: right after ``build_model`` no rank holds a full weight;
* the JSON's values reach the DeepSpeed engine (read back from its config), "auto" takes the run
  config's; a value that conflicts with the run config, a bad file, a misspelt DeepSpeed key and
  flash_attention_2 without flash-attn are refused by the CLI before any work, in one line.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from plora_ray.config.io import build_run_config
from plora_ray.config.schema import RunConfig
from plora_ray.run.checkpoint import read_backbone, save_checkpoint
from plora_ray.run.loop import fit, setup
from plora_ray.run.loss import loss_positions, loss_sum
from plora_ray.run.models import build_model
from gloo_workers import free_port, init_gloo
from test_distributed import merged, relative, run_config

ROOT = Path(__file__).resolve().parents[1]
USER_JSON = ROOT / "examples" / "deepspeed_zero3.json"


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    positions, targets = loss_positions(labels)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "positions": positions, "targets": targets}


def loss_and_grads(model_section):
    cfg = build_run_config({"plora": {"unload_every_steps": 1}, "model": model_section})
    model, _ = build_model(cfg)
    with torch.no_grad():  # B = 0 at init would leave A's gradient zero: give B values
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    calls = []  # forward passes through one layer's q_proj: twice per step when recomputed
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    loss = loss_sum(model, batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.item(), grads, len(calls)


@pytest.mark.parametrize("checkpointing, attention", [(True, "sdpa"), (False, "eager"), (True, "eager")])
def test_checkpointing_and_attention_change_no_loss_or_gradient(checkpointing, attention):
    _, ref_loss, ref_grads, ref_calls = loss_and_grads({})
    model, loss, grads, calls = loss_and_grads({"gradient_checkpointing": checkpointing,
                                                "attn_implementation": attention})
    assert model.config._attn_implementation == attention
    assert (ref_calls, calls) == (1, 2 if checkpointing else 1)  # the layer really is recomputed
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    worst = max(relative(grads[n], ref_grads[n]) for n in grads)
    assert worst < 1e-5, worst
    if attention == "sdpa":  # recomputation replays the same kernels: bit for bit
        assert loss == ref_loss and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def trained(cfg, tmp_path, name):
    run = fit(setup(cfg), progress=False)
    d = save_checkpoint(run, tmp_path / name)
    base = without_memory_controls(cfg)
    return ([h["loss"] for h in run.history], run.unloads,
            {"trainable": load_file(str(d / "trainable.safetensors")), "backbone": read_backbone(setup(base), d)})


def without_memory_controls(cfg: RunConfig, workers=None) -> RunConfig:
    """The one-process reference: the same global batches, no checkpointing, sdpa, DDP."""
    d, data = cfg.distributed, cfg.data
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"gradient_checkpointing": False, "attn_implementation": "sdpa"}),
        "data": data.model_copy(update={"gradient_accumulation_steps": data.gradient_accumulation_steps * d.workers}),
        "distributed": d.model_copy(update={"workers": 1, "engine": "ddp", "offload_optimizer": False,
                                            "deepspeed_config": None})})


def assert_same_run(history, files, ref_history, ref_files, tol):
    assert history == pytest.approx(ref_history, rel=10 * tol)
    assert files["backbone"].keys() == ref_files["backbone"].keys()
    worst_merged = max(relative(merged(files, k), merged(ref_files, k)) for k in ref_files["backbone"])
    worst_factor = max(relative(files["trainable"][k], v) for k, v in ref_files["trainable"].items())
    print(f"merged weights {worst_merged:.1e}, LoRA factors {worst_factor:.1e} relative to the reference")
    assert worst_merged < tol and worst_factor < 10 * tol, (worst_merged, worst_factor)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_process_unloads_stay_exact_with_checkpointing(tmp_path, attention):
    cfg = run_config(workers=1, model={"gradient_checkpointing": True, "attn_implementation": attention},
                     data={"gradient_accumulation_steps": 2})  # the global batch of two workers
    history, unloads, files = trained(cfg, tmp_path, "memory")
    ref_history, _, ref_files = trained(without_memory_controls(cfg), tmp_path, "reference")
    assert len(unloads) == 4 and all(e.output_change < 1e-5 for e in unloads)  # preserve rule: exact
    if attention == "sdpa":  # recomputation replays the same kernels: the same run, bit for bit
        assert history == ref_history
        assert all(torch.equal(files[k][n], ref_files[k][n]) for k in files for n in ref_files[k])
    # eager attention rounds differently from sdpa (~1e-7 on a step's loss); eight AdamW steps at
    # lr 1e-2 amplify that (measured: 2.5e-5 on the merged weights, 1.1e-4 on one factor)
    assert_same_run(history, files, ref_history, ref_files, tol=1e-5 if attention == "sdpa" else 1e-4)


# ----------------------------------------------------------------------- two gloo workers


def worker(rank, world, port, cfg_json, out_dir):
    init_gloo(rank, world, port)
    cfg = RunConfig.model_validate_json(cfg_json)
    d, info = cfg.distributed, {}
    if d.engine == "deepspeed" and d.zero_stage == 3:  # what each rank holds right after construction
        model, _ = build_model(cfg, world)
        info["base"] = [{"name": n, "local": p.data.numel(), "numel": getattr(p, "ds_numel", None),
                         "partition": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None}
                        for n, p in model.named_parameters() if "lora_" not in n]
        del model
    run = fit(setup(cfg, rank, world), progress=False)
    save_checkpoint(run, Path(out_dir) / "checkpoint")  # collective; rank 0 writes
    if d.engine == "deepspeed":
        ds = run.engine.model._config  # the engine's own parsed config
        info["engine"] = {"zero": ds.zero_config.model_dump(mode="json", by_alias=True), "gradient_clipping": ds.gradient_clipping,
                          "communication_data_type": str(ds.communication_data_type),
                          "micro_batch": ds.train_micro_batch_size_per_gpu, "bf16": ds.bfloat16_config.enabled,
                          "optimizer": type(run.engine.optimizer).__name__}
    info["history"] = [h["loss"] for h in run.history]
    info["output_change"] = [e.output_change for e in run.unloads]
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(info))
    os._exit(0)  # as test_replicas: the results are on disk; gloo teardown sometimes hung


TWO_WORKERS = {
    "ddp": ({"engine": "ddp"}, {"gradient_checkpointing": True}),
    "zero2-offload": ({"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True},
                      {"gradient_checkpointing": True}),
    "zero3-user-json": ({"engine": "deepspeed", "zero_stage": 3, "deepspeed_config": str(USER_JSON)},
                        {"gradient_checkpointing": True}),
    # from_pretrained (a saved model directory) built partitioned: transformers' DeepSpeed integration
    "zero3-from-pretrained": ({"engine": "deepspeed", "zero_stage": 3}, {"gradient_checkpointing": True}),
}


def saved_tiny(directory: Path) -> str:
    from plora_ray.config.schema import ModelConfig
    from plora_ray.run.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(ModelConfig(), len(tok), 0, tok.eos_token_id, tok.pad_token_id).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(TWO_WORKERS))
def test_two_workers_with_memory_controls_match_one_process(tmp_path, case):
    distributed, model = TWO_WORKERS[case]
    if case == "zero3-from-pretrained":
        model = {**model, "name_or_path": saved_tiny(tmp_path / "base")}
    cfg = run_config(workers=2, distributed=distributed, model=model)
    mp.start_processes(worker, args=(2, free_port(), cfg.model_dump_json(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    infos = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    d = tmp_path / "checkpoint"
    files = {"trainable": load_file(str(d / "trainable.safetensors")),
             "backbone": read_backbone(setup(without_memory_controls(cfg)), d)}
    ref_history, _, ref_files = trained(without_memory_controls(cfg), tmp_path, "reference")
    history = infos[0]["history"]
    assert len(infos[0]["output_change"]) == 4 and all(c < 1e-5 for c in infos[0]["output_change"])
    # DDP and ZeRO-2 as test_distributed measures them; DeepSpeed's CPU Adam and ZeRO-3 round
    # differently from torch's AdamW in one process (see test_distributed for ZeRO-3's drift)
    assert_same_run(history, files, ref_history, ref_files, tol=1e-5 if case == "ddp" else 1e-4)
    if case == "zero2-offload":  # the optimizer step runs on the CPU copy, and PLoRA reset its state
        assert infos[0]["engine"]["optimizer"] == "DeepSpeedCPUAdam"
        assert infos[0]["engine"]["zero"]["offload_optimizer"]["device"] == "cpu"
        from plora_ray.config.paths import extensions_dir  # built (or found) in this environment's folder

        assert (Path(extensions_dir()) / "cpu_adam").is_dir() and "TORCH_EXTENSIONS_DIR" not in os.environ
    if case.startswith("zero3"):
        for info in infos:  # built partitioned: no rank ever held a full base weight
            assert info["base"] and all(p["local"] == 0 and p["partition"] == -(-p["numel"] // 2)
                                        for p in info["base"]), info["base"]
    if case == "zero3-user-json":
        user = json.loads(USER_JSON.read_text())
        engine = infos[0]["engine"]
        zero = engine["zero"]
        assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["sub_group_size"] == user[
            "zero_optimization"]["sub_group_size"]  # the JSON's own values
        hidden = cfg.model.tiny.hidden_size  # its "auto" bucket sizes, from the model's width
        assert (zero["reduce_bucket_size"], zero["stage3_param_persistence_threshold"]) == (hidden**2, 10 * hidden)
        assert engine["communication_data_type"].endswith("float32")
        # "auto" took the run config's values
        assert (engine["micro_batch"], engine["gradient_clipping"], engine["bf16"]) == (
            cfg.data.micro_batch_size, cfg.optim.max_grad_norm, False)


# ------------------------------------------------------------------ refused before any work


def cli(tmp_path, capsys, distributed=None, model=None, json_text=None):
    from plora_ray.cli.train import main

    import yaml

    data = {"name": "refused", "plora": {"unload_every_steps": 1}, "data": {"max_steps": 1},
            "distributed": {"workers": 2, "engine": "deepspeed", "zero_stage": 3, **(distributed or {})},
            "model": model or {}}
    if json_text is not None:
        (tmp_path / "ds.json").write_text(json_text)
        data["distributed"]["deepspeed_config"] = str(tmp_path / "ds.json")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    rc = main([str(tmp_path / "run.yaml"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    return rc, err


ZERO3 = json.dumps({"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("json_text, distributed, expected", [
    (json.dumps({"zero_optimization": {"stage": 2}}), {},
     "sets zero_optimization.stage 2 but distributed.zero_stage gives 3"),
    (json.dumps({"train_micro_batch_size_per_gpu": 16}), {},
     "sets train_micro_batch_size_per_gpu 16 but data.micro_batch_size gives 4"),
    (json.dumps({"bf16": {"enabled": True}}), {}, "sets bf16.enabled true but model.dtype float32 gives false"),
    (json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}), {}, "sets optimizer.type \"Lamb\""),
    (json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}), {},
     "sets a scheduler, but the LR schedule is optim.scheduler"),
    (json.dumps({"zero_optimization": {"stage": 3, "overlap_com": True}}), {},
     "DeepSpeed rejects DeepSpeedZeroConfig overlap_com"),
    ("{\"zero_optimization\": {\"stage\": 3,}}", {}, "is not valid JSON"),
    ("[1, 2]", {}, "must hold a JSON object"),
    (ZERO3, {"engine": "ddp"}, "distributed.deepspeed_config needs distributed.engine: deepspeed"),
])
def test_a_bad_or_conflicting_deepspeed_json_is_refused_in_one_line(tmp_path, capsys, json_text, distributed,
                                                                      expected):
    rc, err = cli(tmp_path, capsys, distributed=distributed, json_text=json_text)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "distributed.deepspeed_config" in err and expected in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_deepspeed_json_is_refused_in_one_line(tmp_path, capsys):
    rc, err = cli(tmp_path, capsys, distributed={"deepspeed_config": str(tmp_path / "nowhere.json")})
    assert rc == 2 and len(err.splitlines()) == 1
    assert "field 'distributed.deepspeed_config'" in err and "not found" in err, err


def test_a_user_json_that_agrees_passes_the_check_and_keeps_its_own_keys():
    from plora_ray.run.dsconfig import check_deepspeed_config

    cfg = run_config(workers=2, distributed={"engine": "deepspeed", "zero_stage": 3, "deepspeed_config": str(USER_JSON)})
    merged_cfg = check_deepspeed_config(cfg)
    assert merged_cfg["train_batch_size"] == cfg.samples_per_step(2)
    assert merged_cfg["optimizer"]["params"]["lr"] == cfg.optim.lr and "scheduler" not in merged_cfg
    assert merged_cfg["zero_optimization"]["stage3_max_live_parameters"] == 1e9


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_is_refused_in_one_line(tmp_path, capsys):
    rc, err = cli(tmp_path, capsys, distributed={"engine": "ddp"}, model={"attn_implementation": "flash_attention_2"})
    assert rc == 2 and len(err.splitlines()) == 1
    assert "field 'model.attn_implementation'" in err and "flash-attn" in err, err


def test_offload_from_the_json_runs_deepspeeds_cpu_adam_and_a_conflicting_device_is_refused(tmp_path):
    from plora_ray.config.schema import ConfigError
    from plora_ray.run.dsconfig import deepspeed_config

    (tmp_path / "offload.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    cfg = run_config(workers=2, distributed={"engine": "deepspeed", "zero_stage": 2,
                                             "deepspeed_config": str(tmp_path / "offload.json")})
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"offload_optimizer": {"device": "cpu"}, "stage": 2}
    assert ds["optimizer"]["params"]["torch_adam"] is False  # the offloaded step: DeepSpeedCPUAdam
    (tmp_path / "nvme.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}))
    cfg = run_config(workers=2, distributed={"engine": "deepspeed", "zero_stage": 2, "offload_optimizer": True,
                                             "deepspeed_config": str(tmp_path / "nvme.json")})
    with pytest.raises(ConfigError, match="sets zero_optimization.offload_optimizer.device \"nvme\" but "
                                          "distributed.offload_optimizer gives \"cpu\""):
        deepspeed_config(cfg, 2)


def test_a_sweep_refuses_the_trial_whose_batch_conflicts_with_the_json(tmp_path):
    import yaml

    from plora_ray.config.schema import ConfigError
    from plora_ray.config.sweep import load_sweep
    from plora_ray.sweep.preflight import check_sweep

    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    spec = {"metric": "train/loss",
            "base": {"plora": {"unload_every_steps": 2}, "data": {"micro_batch_size": 4},
                     "distributed": {"workers": 2, "engine": "deepspeed", "zero_stage": 3,
                                     "deepspeed_config": str(tmp_path / "ds.json")}},
            "space": {"data.micro_batch_size": {"choice": [4, 8]}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        check_sweep(load_sweep(tmp_path / "s.yaml"), tmp_path / "sweeps")
    assert "trial data.micro_batch_size=8" in str(err.value) and \
        "sets train_micro_batch_size_per_gpu 4 but data.micro_batch_size gives 8" in str(err.value), str(err.value)
