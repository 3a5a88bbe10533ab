"""The PLoRA algorithm, on real tensors with real optimizer steps (tiny models)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from plora_ray.run.data import collate
from plora_ray.core.access import LocalAccess
from plora_ray.core.clock import UnloadClock
from plora_ray.core.schedule import StageLR, make_scheduler, refresh_lr
from plora_ray.core.unloader import PeriodicUnloader, lora_layers, lora_parameters
from plora_ray.ledger.rank import RankMeter
from plora_ray.ledger.store import UnloadLedger
from plora_ray.run.loop import setup, train_step
from test_ledger_rank import numerical_rank


def train_steps(run, n):
    for mb in run.steps[:n]:
        train_step(run, mb)


def after_step(unloader, samples):
    """Advance the clock by one optimizer step of ``samples``; unload when due."""
    return unloader.unload() if unloader.clock.step(samples) else None


def logits(run):
    run.model.eval()
    batch = collate(run.examples[:6], run.tokenizer.pad_token_id)
    with torch.no_grad():
        return run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5])
def test_preserve_rule_keeps_outputs_across_unload(tiny_cfg, m):
    run = setup(tiny_cfg(plora={"momentum": m, "momentum_rule": "preserve"}, optim={"lr": 1e-2}))
    train_steps(run, 3)
    assert max(layer.lora_B["default"].weight.abs().max() for layer in run.unloader.layers.values()) > 0
    before = logits(run)
    run.unloader.unload()
    after = logits(run)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_paper_rule_matches_its_formula(tiny_cfg):
    m = 0.3
    run = setup(tiny_cfg(plora={"momentum": m, "momentum_rule": "paper"}, optim={"lr": 1e-2}))
    train_steps(run, 3)
    snap = {}
    for name, layer in run.unloader.layers.items():
        a = layer.lora_A["default"].weight.detach().clone()
        b = layer.lora_B["default"].weight.detach().clone()
        w = layer.get_base_layer().weight.detach().clone()
        snap[name] = (w, a, b, layer.scaling["default"])
    before = logits(run)
    run.unloader.unload()
    for name, layer in run.unloader.layers.items():
        w, a, b, s = snap[name]
        expect_w = w.double() + (1 - m) * s * (b.double() @ a.double())
        assert rel(layer.get_base_layer().weight, expect_w) < 1e-6
        assert rel(layer.lora_A["default"].weight, m * a) < 1e-6
        assert rel(layer.lora_B["default"].weight, m * b) < 1e-6
    # the adapter keeps m^2 s BA: outputs do change under this rule
    assert (logits(run) - before).abs().max() > 1e-5 * before.abs().max()


def test_ledger_rebuilds_weights_after_several_stages(tiny_cfg):
    run = setup(tiny_cfg(plora={"momentum": 0.1}, optim={"lr": 1e-2}))
    w0 = {n: l.get_base_layer().weight.detach().clone() for n, l in run.unloader.layers.items()}
    events = []
    for mb in run.steps[:10]:
        out = train_step(run, mb)
        e = after_step(run.unloader, out["samples"])
        if e:
            events.append(e)
    assert len(events) == 5 and run.unloader.ledger.num_stages == 5
    for name, layer in run.unloader.layers.items():
        w_t = layer.get_base_layer().weight
        assert not torch.equal(w_t, w0[name])
        assert rel(run.unloader.ledger.rebuild(name, w0[name]), w_t) < 1e-6


def test_ledger_roundtrips_through_safetensors(tiny_cfg, tmp_path):
    run = setup(tiny_cfg(optim={"lr": 1e-2}))
    train_steps(run, 2)
    run.unloader.unload()
    train_steps(run, 2)
    run.unloader.unload()
    live = run.unloader.ledger
    assert live.directory is not None and live.nbytes() == 0  # on disk: nothing held once written
    live.save(tmp_path / "ledger")
    shards = sorted(p.name for p in (tmp_path / "ledger").iterdir())
    assert shards == ["stage_00001.safetensors", "stage_00002.safetensors"]
    for name in shards:  # hard links to the live shards, not copies
        assert (tmp_path / "ledger" / name).stat().st_ino == (live.directory / name).stat().st_ino
    for name in shards:  # the shards are plain safetensors files
        assert len(load_file(str(tmp_path / "ledger" / name))) == 2 * len(run.unloader.layers)
    loaded = UnloadLedger.load(tmp_path / "ledger")
    assert loaded.num_stages == 2 and loaded.layers == live.layers == list(run.unloader.layers)
    for name in live.layers:
        assert torch.equal(loaded.delta(name), live.delta(name))


class OneLayer(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def regression_model(seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=1, lora_alpha=1, target_modules=["proj"], init_lora_weights=True)
    return get_peft_model(OneLayer(), cfg)


def fit_regression(model, unloader, stages, steps_per_stage=5, lr=1e-2):
    torch.manual_seed(1)
    target = torch.randn(64, 64)
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr, betas=(0.9, 0.99))
    if unloader is not None:
        unloader.optimizer = opt
    for _ in range(stages):
        for _ in range(steps_per_stage):
            x = torch.randn(32, 64)
            loss = ((model(x) - x @ target.T) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        if unloader is not None:
            unloader.unload()


@pytest.mark.parametrize("stages", [1, 4, 9])
def test_rank_one_plora_accumulates_rank_t_lora_stays_one(stages):
    model = regression_model()
    w0 = model.base_model.model.proj.weight.detach().clone()
    ledger = UnloadLedger()
    unloader = PeriodicUnloader(model, seed=3, ledger=ledger, meter=RankMeter(ledger))
    fit_regression(model, unloader, stages)
    ranks = unloader.ledger.ranks()
    assert ranks == {"proj": stages}
    # the merged update really has that rank (a full SVD is fine in a test)
    delta = model.base_model.model.proj.weight.detach() - w0
    assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6).item() == stages

    lora = regression_model()
    fit_regression(lora, None, stages)
    layer = lora_layers(lora)["proj"]
    b = layer.lora_B["default"].weight.detach() * layer.scaling["default"]
    assert numerical_rank([b], [layer.lora_A["default"].weight.detach()]) == 1


def test_numerical_rank_caps_at_layer_size():
    torch.manual_seed(0)
    bs = [torch.randn(16, 4) for _ in range(6)]
    as_ = [torch.randn(4, 24) for _ in range(6)]
    assert numerical_rank(bs, as_) == 16
    assert numerical_rank([torch.zeros(16, 2)], [torch.randn(2, 24)]) == 0


def trainable_extra(run):
    norm = run.model.base_model.model.model.norm.weight
    return norm


@pytest.mark.parametrize("policy", ["reset", "keep", "prune"])
def test_unload_touches_only_lora_optimizer_state(tiny_cfg, policy):
    cfg = tiny_cfg(plora={"optimizer_on_unload": policy, "prune_ratio": 0.9}, optim={"lr": 1e-2})
    run = setup(cfg)
    norm = trainable_extra(run)
    norm.requires_grad_(True)
    run.optimizer.add_param_group({"params": [norm], "lr": 1e-2})
    run.scheduler.base_lrs.append(1e-2)
    run.scheduler.lr_lambdas.append(run.scheduler.lr_lambdas[0])
    train_steps(run, 3)
    lora = lora_parameters(run.model)
    before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in run.optimizer.state[p].items()}
              for p in lora + [norm]}
    storage = {id(p): {k: v.data_ptr() for k, v in run.optimizer.state[p].items()} for p in lora}
    run.unloader.unload()
    state = run.optimizer.state
    for k, v in before[id(norm)].items():
        assert torch.equal(state[norm][k], v)  # the non-LoRA parameter is untouched
    for p in lora:
        if policy == "reset":  # zeroed in place: the same tensors, all zero, step 0
            assert {k: v.data_ptr() for k, v in state[p].items()} == storage[id(p)]
            assert all(not v.any() for v in state[p].values())
        elif policy == "keep":
            for k, v in before[id(p)].items():
                assert torch.equal(state[p][k], v)
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                t = state[p][k]
                zeros = (t == 0).sum().item()
                assert zeros >= math.floor(0.9 * t.numel())
                kept = t[t != 0].abs()
                if kept.numel():  # the survivors are the largest entries
                    assert kept.min() >= before[id(p)][k].abs().flatten().kthvalue(zeros).values
            assert torch.equal(state[p]["step"], before[id(p)]["step"])
    # after a reset, AdamW restarts the LoRA step counter from zero
    train_steps(run, 1)
    if policy == "reset":
        assert all(state[p]["step"].item() == 1 for p in lora)


def test_in_place_reset_steps_exactly_like_a_fresh_optimizer():
    """After a reset, AdamW's next steps are bit-identical to those of a new AdamW (what
    popping the state gave), with weight decay, amsgrad's extra moment and foreach or not."""
    for kwargs in ({"weight_decay": 0.1}, {"amsgrad": True, "foreach": False}, {"foreach": True}):
        g = torch.Generator().manual_seed(0)
        init = torch.randn(6, 5, generator=g)
        grads = [torch.randn(6, 5, generator=g) for _ in range(5)]
        runs = []
        for fresh in (False, True):
            p = torch.nn.Parameter(init.clone())
            opt = torch.optim.AdamW([p], lr=1e-2, **kwargs)
            for grad in grads[:2]:  # some history to forget
                p.grad = grad.clone()
                opt.step()
            if fresh:
                opt = torch.optim.AdamW([p], lr=1e-2, **kwargs)
            else:
                LocalAccess().reset_optimizer_state(opt, [p], "reset", 0.0)
            trace = []
            for grad in grads[2:]:
                p.grad = grad.clone()
                opt.step()
                trace.append(p.detach().clone())
            runs.append(trace)
        for a, b in zip(*runs):
            assert torch.equal(a, b), kwargs


def lr_trace(cfg, n):
    run = setup(cfg)
    lrs = []
    for mb in run.steps[:n]:
        out = train_step(run, mb)
        lrs.append(out["lr"])
        after_step(run.unloader, out["samples"])
    return lrs


def test_lr_schedule_restarts_or_continues_at_unload(tiny_cfg):
    base = {"optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 3},
            "data": {"epochs": 3}}
    restart = lr_trace(tiny_cfg(plora={"unload_every_steps": 4, "scheduler_on_unload": "restart"}, **base), 12)
    cont = lr_trace(tiny_cfg(plora={"unload_every_steps": 4, "scheduler_on_unload": "continue"}, **base), 12)
    warm = [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3]
    assert restart == pytest.approx(warm * 3)
    assert cont == pytest.approx(warm + [1e-3] * 8)


def test_rewarmup_ramps_after_each_unload():
    sched = StageLR("constant", rewarmup_steps=4)
    assert [sched(s) for s in range(3)] == [1.0, 1.0, 1.0]
    sched.mark_unload(3)
    assert [sched(s) for s in range(3, 9)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_schedule_restart_decays_within_stage():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, StageLR("linear", horizon_steps=4))
    lrs = []
    for step in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if step == 3:
            sched.lr_lambdas[0].mark_unload(sched.last_epoch)
            refresh_lr(sched)
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25] * 2)


def test_clock_fires_at_sample_counts_with_accumulation_and_short_last_batch(tiny_cfg, tmp_path):
    import json
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(50)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_cfg(plora={"unload_every_steps": None, "unload_every_samples": 24},
                   data={"train_files": [str(f)], "micro_batch_size": 4,
                         "gradient_accumulation_steps": 3, "epochs": 2})
    run = setup(cfg)
    sizes = [sum(len(mb) for mb in step) for step in run.steps]
    assert sizes == [12, 12, 12, 12, 2] * 2  # the epoch's last step is one short micro-batch
    fired = []
    for mb in run.steps:
        out = train_step(run, mb)
        e = after_step(run.unloader, out["samples"])
        if e:
            fired.append((e.step, e.samples))
    # first step boundary at or past each multiple of 24 samples
    assert fired == [(2, 24), (4, 48), (7, 74), (9, 98)]


def test_clock_by_steps_and_never():
    c = UnloadClock(every_steps=3)
    assert [c.step(5) for _ in range(7)] == [False, False, True, False, False, True, False]
    never = UnloadClock()
    assert not any(never.step(100) for _ in range(50)) and never.samples == 5000
    many = UnloadClock(every_samples=10)
    assert [many.step(24) for _ in range(3)] == [True, True, True] and many.unloads == 3


def test_lora_never_unloads_and_full_trains_all_weights(tiny_cfg):
    from plora_ray.run.loop import fit

    lora = fit(setup(tiny_cfg(method="lora", plora={"unload_every_steps": None}, data={"max_steps": 6})),
               progress=False)
    assert lora.unloader is None and lora.unloads == [] and lora.clock.steps == 6
    for layer in lora_layers(lora.model).values():
        assert layer.lora_B["default"].weight.abs().max() > 0
    base_trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base_trainable == []

    cfg = tiny_cfg(method="full", plora={"unload_every_steps": None}, data={"max_steps": 3},
                   optim={"lr": 1e-2})
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    fit(run, progress=False)
    assert lora_layers(run.model) == {}
    unchanged = [n for n, p in run.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [] and len(before) > 10


def test_reinit_of_a_is_seeded_per_layer_and_stage():
    def first_a(seed):
        model = regression_model()
        u = PeriodicUnloader(model, seed=seed)
        fit_regression(model, u, 1)
        return lora_layers(model)["proj"].lora_A["default"].weight.detach().clone()

    assert torch.equal(first_a(7), first_a(7))
    assert not torch.equal(first_a(7), first_a(8))


def test_bf16_backbone_merges_in_fp32_and_casts_once(tiny_cfg):
    run = setup(tiny_cfg(model={"dtype": "bfloat16"}, optim={"lr": 1e-2}))
    layer = next(iter(run.unloader.layers.values()))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    train_steps(run, 2)
    w = layer.get_base_layer().weight.detach().clone()
    a = layer.lora_A["default"].weight.detach().clone()
    b = layer.lora_B["default"].weight.detach().clone()
    run.unloader.unload()
    expect = (w.float() + layer.scaling["default"] * (b @ a)).to(torch.bfloat16)
    assert torch.equal(layer.get_base_layer().weight, expect)
