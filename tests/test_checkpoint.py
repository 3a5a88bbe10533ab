"""Resume mid-stage, across unloads: the continued run matches an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from plora_ray.run.checkpoint import CheckpointMismatch, load_checkpoint, read_backbone, save_checkpoint
from plora_ray.run.loop import fit, setup


def resume_at(cfg, step, directory):
    """Train ``cfg`` to ``step``, checkpoint, and return a fresh run restored from it."""
    saved = {}

    def keep(run, final, scores):
        if run.clock.steps == step:
            saved["dir"] = save_checkpoint(run, directory)

    fit(setup(cfg.model_copy(update={"checkpoint_every_steps": step})), on_checkpoint=keep, progress=False)
    resumed = setup(cfg)
    load_checkpoint(resumed, saved["dir"])
    return resumed


@pytest.mark.parametrize("policy", ["reset", "prune"])
def test_resume_mid_stage_reproduces_the_uninterrupted_losses(tiny_cfg, tmp_path, policy):
    cfg = tiny_cfg(plora={"unload_every_steps": 3, "momentum": 0.1, "optimizer_on_unload": policy},
                   optim={"lr": 1e-2, "scheduler": "linear", "warmup_steps": 2},
                   lora={"dropout": 0.1},  # consumes RNG: the RNG state must be restored too
                   data={"max_steps": 11})
    full = fit(setup(cfg), progress=False)
    resumed = resume_at(cfg, 5, tmp_path / "ckpt")
    assert resumed.start_step == 5 and resumed.unloader.stage == 1
    fit(resumed, progress=False)

    assert len(resumed.history) == len(full.history) == 11
    for a, b in zip(resumed.history, full.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert [e.step for e in resumed.unloads] == [e.step for e in full.unloads] == [3, 6, 9]
    assert resumed.unloader.ledger.num_stages == 3


def test_ledger_only_checkpoint_resumes_bit_exactly_with_a_bf16_backbone(tiny_cfg, tmp_path):
    cfg = tiny_cfg(model={"dtype": "bfloat16"}, plora={"unload_every_steps": 2, "momentum": 0.1},
                   optim={"lr": 1e-2}, data={"max_steps": 9})
    full = fit(setup(cfg), progress=False)
    resumed = resume_at(cfg, 7, tmp_path / "ckpt")  # after 3 unloads, mid-stage
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "backbone.safetensors" not in files and "ledger" in files
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "ledger").iterdir())
    assert shards == [f"stage_0000{t}.safetensors" for t in (1, 2, 3)]  # one per unload so far
    fit(resumed, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    ref = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, ref[name]), name
    assert resumed.unloads[-1].ranks == full.unloads[-1].ranks


@pytest.mark.parametrize("momentum,fused", [(0.0, False), (0.1, False), (0.1, True)])  # 0: A re-initialised in place
def test_replayed_backbone_equals_the_trained_one_bitwise(tiny_cfg, tmp_path, momentum, fused, monkeypatch):
    from plora_ray.kernels import merge_bf16 as merge_kernel

    # fused: the tiny layers go through the fused bf16 kernel too (unloads and replay alike)
    monkeypatch.setattr(merge_kernel, "MIN_ELEMENTS", 1 if fused else 1 << 62)
    if fused and merge_kernel.kernel(8) is None:
        pytest.skip("the fused merge kernel cannot be built here (no C compiler or no AVX2)")
    cfg = tiny_cfg(model={"dtype": "bfloat16"}, plora={"unload_every_steps": 1, "momentum": momentum},
                   optim={"lr": 2e-2}, data={"max_steps": 5})
    run = fit(setup(cfg), progress=False)
    save_checkpoint(run, tmp_path / "ckpt")
    rebuilt = read_backbone(setup(cfg), tmp_path / "ckpt")
    trained = dict(run.model.named_parameters())
    assert len(rebuilt) == len(run.unloader.layers)
    for name, w in rebuilt.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, trained[name]), name


def test_checkpoint_without_ledger_stores_backbone_copies(tiny_cfg, tmp_path):
    cfg = tiny_cfg(plora={"unload_every_steps": 2, "ledger": False}, optim={"lr": 1e-2}, data={"max_steps": 5})
    full = fit(setup(cfg), progress=False)
    resumed = resume_at(cfg, 3, tmp_path / "ckpt")
    assert load_file(str(tmp_path / "ckpt" / "backbone.safetensors")).keys()
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["backbone"] == "copies"
    fit(resumed, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_checkpoint_of_another_base_model_is_refused_in_one_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg(data={"max_steps": 3})
    run = fit(setup(cfg), progress=False)
    save_checkpoint(run, tmp_path / "ckpt")
    other = setup(cfg.model_copy(update={"seed": 1}))  # the tiny model's W_0 comes from the seed
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(other, tmp_path / "ckpt")
    msg = str(err.value)
    assert "base model differs" in msg and "model.name_or_path" in msg and "\n" not in msg
    assert other.start_step == 0 and other.history == []  # nothing was restored


def test_scheduler_state_is_restored_through_state_dict(tiny_cfg, tmp_path):
    cfg = tiny_cfg(plora={"unload_every_steps": 3, "rewarmup_steps": 2},
                   optim={"scheduler": "cosine", "warmup_steps": 1}, data={"max_steps": 8})
    reference = setup(cfg)
    for mb in reference.steps[:5]:
        from plora_ray.run.loop import train_step

        out = train_step(reference, mb)
        if reference.clock.step(out["samples"]):
            reference.unloader.unload()
    resumed = resume_at(cfg, 5, tmp_path / "ckpt")
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.scheduler.lr_lambdas[0].stage_start == 3 and resumed.scheduler.lr_lambdas[0].unloads == 1
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
