"""Checkpoints that resume mid-stage, across unloads, under every engine. No pickle.

A checkpoint directory holds:

* ``trainable.safetensors`` — the trainable parameters in full fp32 (LoRA A/B, or every
  weight for full fine-tuning), read from the engine's master copy;
* ``backbone.safetensors`` — the backbone weights unloads have changed (PLoRA's target
  layers, in their own dtype, so the restored W_T is bit-exact);
* ``optimizer.safetensors`` — AdamW's exp_avg, exp_avg_sq and step per trainable parameter;
* ``ledger.safetensors`` — the unload ledger;
* ``rng.safetensors`` — every rank's torch RNG state (ranks draw different dropout masks);
* ``state.json`` — step, samples, unload clock, stage, scheduler state, metric history.

Saving is collective (every rank calls it; under ZeRO the full tensors are gathered) and
rank 0 writes; loading runs on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .plora import UnloadEvent, UnloadLedger

FORMAT = 1


def backbone_params(run) -> dict[str, torch.nn.Parameter]:
    if run.unloader is None:
        return {}
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(layer.get_base_layer().weight)]: layer.get_base_layer().weight
            for layer in run.unloader.layers.values()}


def _event_dict(e: UnloadEvent) -> dict:
    return {"stage": e.stage, "step": e.step, "samples": e.samples, "seconds": e.seconds,
            "ranks": e.ranks, "output_change": e.output_change}


def _gather_rng(run) -> dict[str, torch.Tensor]:
    local = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        local["cuda"] = torch.cuda.get_rng_state()
    states = [local]
    if run.world > 1 and dist.is_initialized():
        states = [None] * run.world
        dist.all_gather_object(states, local)
    return {f"{k}.{rank}": v for rank, st in enumerate(states) for k, v in st.items()}


def save_checkpoint(run, directory: str | Path) -> Path | None:
    """Collective. Returns the directory on rank 0, None elsewhere."""
    acc = run.engine.access
    trainable, optim = {}, {}
    for name, p in run.model.named_parameters():
        if not p.requires_grad:
            continue
        with acc.gathered([p]):
            trainable[name] = acc.read(p).cpu().contiguous()
        for key, value in acc.read_optimizer_state(p).items():
            optim[f"{name}::{key}"] = value.cpu().contiguous()
    rng = _gather_rng(run)  # every rank draws its own dropout masks
    backbone = {}
    for name, w in backbone_params(run).items():
        with acc.gathered([w]):
            backbone[name] = w.detach().cpu().clone().contiguous()
    if run.rank != 0:
        return None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable, str(out / "trainable.safetensors"))
    save_file(backbone or {"_empty": torch.zeros(0)}, str(out / "backbone.safetensors"))
    save_file(optim or {"_empty": torch.zeros(0)}, str(out / "optimizer.safetensors"))
    if run.unloader is not None and run.unloader.ledger is not None:
        run.unloader.ledger.save(out / "ledger.safetensors")
    save_file(rng, str(out / "rng.safetensors"))
    sched = run.scheduler
    state = {
        "format": FORMAT,
        "method": run.cfg.method,
        "step": run.clock.steps,
        "clock": run.clock.state_dict(),
        "unloader": run.unloader.state_dict() if run.unloader else None,
        "scheduler": {"last_epoch": sched.last_epoch, "base_lrs": sched.base_lrs,
                      "last_lr": sched.get_last_lr(), "schedule": sched.lr_lambdas[0].__dict__},
        "history": run.history,
        "unloads": [_event_dict(e) for e in run.unloads],
    }
    (out / "state.json").write_text(json.dumps(state))
    return out


def load_checkpoint(run, directory: str | Path) -> None:
    """Restore ``run`` (already set up from the same config) to the checkpointed step."""
    d = Path(directory)
    state = json.loads((d / "state.json").read_text())
    if state.get("format") != FORMAT or state["method"] != run.cfg.method:
        raise ValueError(f"{d}: checkpoint of format {state.get('format')} / method "
                         f"{state.get('method')} does not match this run")
    acc = run.engine.access
    trainable = load_file(str(d / "trainable.safetensors"))
    backbone = load_file(str(d / "backbone.safetensors"))
    optim = load_file(str(d / "optimizer.safetensors"))
    for name, p in run.model.named_parameters():
        if name in backbone:
            with acc.gathered([p], modify=True):
                p.data.copy_(backbone[name].to(p.device))
        if not p.requires_grad:
            continue
        with acc.gathered([p], modify=True):
            acc.write(p, trainable[name])
        st = {k.split("::", 1)[1]: v for k, v in optim.items() if k.split("::", 1)[0] == name}
        acc.write_optimizer_state(p, st)
    run.clock.load_state_dict(state["clock"])
    if run.unloader is not None:
        run.unloader.load_state_dict(state["unloader"])
        if run.unloader.ledger is not None and (d / "ledger.safetensors").exists():
            run.unloader.ledger = UnloadLedger.load(d / "ledger.safetensors")
    s = state["scheduler"]
    sched = run.scheduler
    sched.lr_lambdas[0].__dict__.update(s["schedule"])
    sched.last_epoch, sched.base_lrs = s["last_epoch"], s["base_lrs"]
    sched._last_lr = s["last_lr"]
    for group, lr in zip(run.optimizer.param_groups, s["last_lr"]):
        group["lr"] = lr
    rng = load_file(str(d / "rng.safetensors"))
    mine = run.rank if f"torch.{run.rank}" in rng else 0  # a different world size reuses rank 0's
    torch.set_rng_state(rng[f"torch.{mine}"])
    if f"cuda.{mine}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.{mine}"])
    run.history = list(state["history"])
    run.unloads = [UnloadEvent(**e) for e in state["unloads"]]
    run.start_step = state["step"]
