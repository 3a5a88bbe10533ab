"""Resume mid-stage, across unloads: the continued run matches an uninterrupted one."""

import pytest

from plora_ray.checkpoint import load_checkpoint, save_checkpoint
from plora_ray.train import fit, setup


@pytest.mark.parametrize("policy", ["reset", "prune"])
def test_resume_mid_stage_reproduces_the_uninterrupted_losses(tiny_cfg, tmp_path, policy):
    cfg = tiny_cfg(plora={"unload_every_steps": 3, "momentum": 0.1, "optimizer_on_unload": policy},
                   optim={"lr": 1e-2, "scheduler": "linear", "warmup_steps": 2},
                   lora={"dropout": 0.1},  # consumes RNG: the RNG state must be restored too
                   data={"max_steps": 11})
    full = fit(setup(cfg), progress=False)

    saved = {}

    def keep_step_5(run, final):
        if run.clock.steps == 5:
            saved["dir"] = save_checkpoint(run, tmp_path / "ckpt")

    fit(setup(cfg.model_copy(update={"checkpoint_every_steps": 5})), on_checkpoint=keep_step_5, progress=False)
    resumed = setup(cfg)
    load_checkpoint(resumed, saved["dir"])
    assert resumed.start_step == 5 and resumed.unloader.stage == 1
    fit(resumed, progress=False)

    assert len(resumed.history) == len(full.history) == 11
    for a, b in zip(resumed.history, full.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert [e.step for e in resumed.unloads] == [e.step for e in full.unloads] == [3, 6, 9]
    assert resumed.unloader.ledger.num_stages == 3
