"""A trained run as something other tools load: a merged Hugging Face model folder, or an
adapter relative to the base model. ``python -m plora_ray.export`` (:mod:`plora_ray.cli.export`)
finds the checkpoint and calls these.

Both rebuild the run from its checkpoint (:func:`plora_ray.run.rundir.restore_run`: the base
model, the unload ledger replayed, the live adapter) and write into ``out``:

* :func:`export_merged`: W_T + the live adapter, merged, by the run directory's own ``merged/``
  writer (:func:`~plora_ray.run.rundir.save_merged`), in ``dtype`` and safetensors shards, with the
  tokenizer: ``AutoModelForCausalLM.from_pretrained``, lm-eval's ``hf`` model and vLLM load it.
* :func:`export_adapter`: one peft LoRA adapter whose product is the whole update relative to the
  base, W_T + s B A - W_0 = sum_t (c s B_t) A_t + s B A: every stage's factors from the ledger and
  the live ones, stacked to rank (T + 1) r with scale 1 (``PeftModel.from_pretrained(base, out)``),
  plus the ledger itself (``ledger/``, for the bit-exact replay of W_T) and the tokenizer.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.core.unloader import ADAPTER, lora_layers
from plora_ray.ledger.store import UnloadLedger
from plora_ray.run.checkpoint import LEDGER
from plora_ray.run.rundir import restore_run, save_merged

PROVENANCE = "plora_export.json"  # what was exported, from which checkpoint


def check_adapter_export(cfg: RunConfig, ckpt: Path) -> None:
    """Before any work: can this checkpoint be written as an adapter relative to the base?"""
    if cfg.method == "full":
        raise ConfigError(f"--adapter: {ckpt} is a full fine-tuning run (method: full): it has no "
                          "adapter; drop --adapter to export the merged model")
    if cfg.method == "plora" and not (ckpt / LEDGER).is_dir() and (ckpt / "backbone.safetensors").is_file():
        raise ConfigError(f"--adapter: {ckpt} keeps copies of the unloaded layers, not the unload ledger "
                          "(plora.ledger: false): drop --adapter to export the merged model")


def _provenance(run, ckpt: Path, out: Path, source: str | None, **extra) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    record = {"checkpoint": source or str(ckpt.resolve()), "method": run.cfg.method, "step": state.get("step"),
              "base_model": run.cfg.model.name_or_path, "unloads": len(run.unloads), **extra}
    (out / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def export_merged(ckpt: Path, out: Path, dtype: str = "bfloat16", max_shard_size: str = "5GB",
                  source: str | None = None) -> Path:
    """The merged model of checkpoint ``ckpt`` as a Hugging Face folder in ``out``; ``source``:
    where the checkpoint came from, if not ``ckpt`` (a URI), for ``plora_export.json``."""
    run = restore_run(ckpt)
    save_merged(run, out, dtype=dtype, max_shard_size=max_shard_size)
    _provenance(run, ckpt, out, source, export="merged", dtype=dtype)
    return out


def stacked_adapter(run, ledger: UnloadLedger | None) -> tuple[dict[str, torch.Tensor], int]:
    """``({peft key: fp32 factor}, rank)``: per LoRA layer, B = [B_1 .. B_T, s B] and
    A = [A_1; ..; A_T; A] (a layer absent from the ledger gets zero factors for its stages), so
    B A is the layer's whole update relative to W_0 at scale 1."""
    stages = ledger.num_stages if ledger is not None else 0
    tensors, rank = {}, None
    for name, layer in lora_layers(run.model, ADAPTER).items():
        a, b = layer.lora_A[ADAPTER].weight.detach().float(), layer.lora_B[ADAPTER].weight.detach().float()
        pairs = list(ledger.stage_factors(name)) if ledger is not None and name in ledger.layers else []
        pairs += [(torch.zeros_like(b), torch.zeros_like(a))] * (stages - len(pairs))
        pairs.append((b * layer.scaling[ADAPTER], a))
        bs, as_ = zip(*pairs)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_B.weight"] = torch.cat(bs, dim=1).contiguous()
        tensors[f"{key}.lora_A.weight"] = torch.cat(as_, dim=0).contiguous()
        rank = tensors[f"{key}.lora_A.weight"].shape[0]
    return tensors, rank


def export_adapter(ckpt: Path, out: Path, source: str | None = None) -> Path:
    """Checkpoint ``ckpt`` as a peft adapter relative to its base model, with its ledger."""
    run = restore_run(ckpt)
    check_adapter_export(run.cfg, ckpt)
    ledger = UnloadLedger.load(ckpt / LEDGER) if (ckpt / LEDGER).is_dir() else None
    tensors, rank = stacked_adapter(run, ledger)
    config = copy.deepcopy(run.model.peft_config[ADAPTER])
    config.r, config.lora_alpha, config.lora_dropout = rank, rank, 0.0  # scale alpha / r = 1
    config.use_rslora, config.rank_pattern, config.alpha_pattern = False, {}, {}
    config.base_model_name_or_path = run.cfg.model.name_or_path
    config.inference_mode = True
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if ledger is not None:
        shutil.copytree(ckpt / LEDGER, out / LEDGER)
    run.tokenizer.save_pretrained(str(out))
    _provenance(run, ckpt, out, source, export="adapter", rank=rank, stages=ledger.num_stages if ledger else 0)
    return out
