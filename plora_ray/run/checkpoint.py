"""Checkpoints that resume mid-stage, across unloads, under every engine. No pickle.

A checkpoint directory holds:

* ``trainable.safetensors`` — the trainable parameters in full fp32 (LoRA A/B, or every
  weight for full fine-tuning), read from the engine's master copy;
* ``ledger/stage_00001.safetensors ...`` — the unload ledger, one shard per stage,
  hard-linked from the live ledger's shards (they never change once written; a copy where
  a link is impossible), so the directory is self-contained when Ray persists it and a
  checkpoint costs no copy of the factors. It *is* the backbone: W_T is rebuilt from the
  base model by replaying it stage by stage (``UnloadLedger.replay_into_``: the unload's
  own fp32 merge and cast, so bit-exact). T r (d + k) fp32 numbers per layer instead of a
  d x k copy; ``state.json`` records the digest of W_0 and a different base model is
  refused (:class:`CheckpointMismatch`);
* ``backbone.safetensors`` — only when the run keeps no ledger (``plora.ledger: false``):
  full copies of the unloaded layers, in their own dtype;
* ``optimizer.safetensors`` — AdamW's exp_avg, exp_avg_sq and step per trainable parameter;
* ``rng.safetensors`` — every rank's torch RNG state (ranks draw different dropout masks);
* ``state.json`` — step, samples, unload clock, stage, ``scheduler.state_dict()``, history.

Saving is collective: under ZeRO the full tensors are assembled by collectives every rank
must join, but only rank 0 copies them to host memory and writes; the others drop them.
Loading runs on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from plora_ray.config.schema import ConfigError
from plora_ray.core.unloader import UnloadEvent
from plora_ray.ledger.store import UnloadLedger

LEDGER = "ledger"
FORMAT = 3  # 3: the ledger as a directory of per-stage shards


class CheckpointMismatch(ConfigError):
    """The checkpoint cannot resume this run (other format, method or base model)."""


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


def _factored(run) -> bool:
    return run.unloader is not None and run.unloader.keeps_ledger


def save_checkpoint(run, directory: str | Path) -> Path | None:
    """Collective. Returns the directory on rank 0, None elsewhere."""
    acc = run.engine.access
    keep = run.rank == 0
    trainable, optim = {}, {}
    for name, p in run.model.named_parameters():
        if not p.requires_grad:
            continue
        with acc.gathered([p]):
            full = acc.read(p)  # collective under ZeRO: every rank joins, rank 0 keeps
            if keep:
                trainable[name] = full.cpu().contiguous()
            del full
        state = acc.read_optimizer_state(p)  # collective under ZeRO too
        if keep:
            optim.update({f"{name}::{k}": v.cpu().contiguous() for k, v in state.items()})
        del state
    rng = _gather_rng(run)  # every rank draws its own dropout masks
    backbone = {}
    if run.unloader is not None and not _factored(run):
        for name, w in backbone_params(run).items():
            with acc.gathered([w]):
                if keep:
                    backbone[name] = w.detach().cpu().clone().contiguous()
    if not keep:
        return None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trainable, str(out / "trainable.safetensors"))
    if backbone:
        save_file(backbone, str(out / "backbone.safetensors"))
    save_file(optim or {"_empty": torch.zeros(0)}, str(out / "optimizer.safetensors"))
    if _factored(run):
        run.unloader.ledger.save(out / LEDGER)
    save_file(rng, str(out / "rng.safetensors"))
    state = {
        "format": FORMAT,
        "method": run.cfg.method,
        "backbone": "ledger" if _factored(run) else ("copies" if backbone else "base"),
        "base_digest": run.unloader.base_digest if run.unloader else None,
        "step": run.clock.steps,
        "clock": run.clock.state_dict(),
        "unloader": run.unloader.state_dict() if run.unloader else None,
        "scheduler": run.scheduler.state_dict(),  # StageLR's fields ride in 'lr_lambdas'
        "history": run.history,
        "unloads": [_event_dict(e) for e in run.unloads],
    }
    (out / "state.json").write_text(json.dumps(state))
    return out


def _check(run, d: Path, state: dict) -> None:
    """Refuse, with one line, a checkpoint this run cannot continue (before loading tensors)."""
    if state.get("format") != FORMAT:
        raise CheckpointMismatch(f"{d}: checkpoint format {state.get('format')}, this version reads "
                                 f"{FORMAT}: start the run afresh")
    if state["method"] != run.cfg.method:
        raise CheckpointMismatch(f"{d}: checkpoint of method '{state['method']}' cannot resume a "
                                 f"'{run.cfg.method}' run: set 'method: {state['method']}'")
    if state["backbone"] == "ledger":
        if not _factored(run):
            raise CheckpointMismatch(f"{d}: the checkpoint stores the unload ledger, not the backbone: "
                                     "resume with 'plora.ledger: true'")
        if state["base_digest"] != run.unloader.base_digest:
            raise CheckpointMismatch(
                f"{d}: base model differs from the one this checkpoint was trained from (digest of "
                f"the target layers {run.unloader.base_digest[:12]} != {state['base_digest'][:12]}): "
                "set model.name_or_path (and model.dtype) as in that run")


def load_checkpoint(run, directory: str | Path) -> None:
    """Restore ``run`` (freshly set up from the same config) to the checkpointed step."""
    d = Path(directory)
    state = json.loads((d / "state.json").read_text())
    _check(run, d, state)
    acc = run.engine.access
    trainable = load_file(str(d / "trainable.safetensors"))
    optim = load_file(str(d / "optimizer.safetensors"))
    if state["backbone"] == "ledger":
        ledger = UnloadLedger.load(d / LEDGER)
        for name, layer in run.unloader.layers.items():
            w = layer.get_base_layer().weight
            with acc.gathered([w], modify=True):  # w holds W_0: the run was just set up
                ledger.replay_into_(name, w.data, getattr(layer, "fan_in_fan_out", False))
        if run.unloader.ledger is not None:  # the rank that holds the ledger continues it
            run.unloader.ledger.adopt(ledger)
    elif state["backbone"] == "copies":
        backbone = load_file(str(d / "backbone.safetensors"))
        for name, w in backbone_params(run).items():
            with acc.gathered([w], modify=True):
                w.data.copy_(backbone[name].to(w.device))
    for name, p in run.model.named_parameters():
        if not p.requires_grad:
            continue
        with acc.gathered([p], modify=True):
            acc.write(p, trainable[name])
        st = {k.split("::", 1)[1]: v for k, v in optim.items() if k.split("::", 1)[0] == name}
        acc.write_optimizer_state(p, st)
    run.clock.load_state_dict(state["clock"])
    if run.unloader is not None:
        run.unloader.load_state_dict(state["unloader"])
    run.scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_last_lr()):
        group["lr"] = lr  # the optimizer's lr is not part of the per-parameter state saved above
    rng = load_file(str(d / "rng.safetensors"))
    mine = run.rank if f"torch.{run.rank}" in rng else 0  # a different world size reuses rank 0's
    torch.set_rng_state(rng[f"torch.{mine}"])
    if f"cuda.{mine}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.{mine}"])
    run.history = list(state["history"])
    run.unloads = [UnloadEvent(**e) for e in state["unloads"]]
    run.ranks_printed = len(run.unloads)  # printed by the run that saved them
    run.start_step = state["step"]


def read_backbone(run, directory: str | Path) -> dict[str, torch.Tensor]:
    """The unloaded layers' W_T stored in a checkpoint, by parameter name: the copies, or the
    ledger replayed onto ``run``'s base weights (a freshly set-up run: they are W_0).
    Single process (for tests and analysis)."""
    d = Path(directory)
    if (d / "backbone.safetensors").exists():
        return load_file(str(d / "backbone.safetensors"))
    ledger = UnloadLedger.load(d / LEDGER)
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {names[id(layer.get_base_layer().weight)]:
            ledger.replay(name, layer.get_base_layer().weight.detach(), getattr(layer, "fan_in_fan_out", False))
            for name, layer in run.unloader.layers.items()}
