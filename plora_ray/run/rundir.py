"""The run directory: what a run leaves behind, written the same way by one process and by Ray.

    <run>/config.yaml          the run's full config
    <run>/metrics.jsonl        one line per step, then unload and eval events
    <run>/summary.json         steps, samples, losses, unloads, accumulated rank
    <run>/checkpoint/          the last checkpoint (``--resume`` continues from it); it also holds
                               config.yaml and evals.json, so it can be evaluated on its own
    <run>/adapter/             the live peft adapter of the last stage (see ADAPTER_NOTE)
    <run>/ledger/              every unload's merged factors, one shard per stage (PLoRA)
    <run>/tokenizer/
    <run>/merged/              the trained model as a Hugging Face model directory (config.json,
                               model.safetensors, tokenizer, generation_config.json), unless
                               ``save_merged: false``: what transformers, lm-eval and vLLM load

Checkpoints are read and written through :mod:`plora_ray.run.checkpoint`; this module adds the
files that make a checkpoint self-describing, and rebuilds a model from any of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from plora_ray.run.checkpoint import load_checkpoint, save_checkpoint
from plora_ray.config.io import build_run_config
from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.run.loop import Run, event_record, setup

CHECKPOINT = "checkpoint"
MERGED = "merged"
ADAPTER_NOTE = ("Under PLoRA this adapter is only the last stage's live update: every earlier stage "
                "was merged into the backbone at its unload (ledger/ holds them). The "
                "trained model is merged/ (or the backbone of checkpoint/ plus this adapter), not the "
                "base model plus this adapter.")


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_run_checkpoint(run: Run, directory: str | Path) -> Path | None:
    """Collective (every rank calls it): the checkpoint, plus its config and evaluations.
    Returns the directory on rank 0, None elsewhere."""
    written = save_checkpoint(run, directory)
    if written is not None:
        written = Path(written)
        (written / "config.yaml").write_text(config_yaml(run.cfg))
        (written / "evals.json").write_text(json.dumps(run.evals))
    return written


def load_run_checkpoint(run: Run, directory: str | Path) -> None:
    load_checkpoint(run, directory)
    evals = Path(directory) / "evals.json"
    run.evals = json.loads(evals.read_text()) if evals.is_file() else []


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, dropping the old ``dst`` only once ``src`` is complete."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path: str | Path) -> Path | None:
    """The checkpoint a path names: a checkpoint directory itself, or a run directory's."""
    p = Path(path).expanduser()
    for d in (p, p / CHECKPOINT):
        if (d / "state.json").is_file():
            return d
    return None


def checkpoint_config(ckpt: Path) -> RunConfig:
    for f in (ckpt / "config.yaml", ckpt.parent / "config.yaml"):
        if f.is_file():
            return build_run_config(yaml.safe_load(f.read_text()) or {}, source=str(f))
    raise ConfigError(f"{ckpt}: no config.yaml in the checkpoint or beside it: cannot tell which "
                      "model it belongs to")


def restore_run(path: str | Path) -> Run:
    """A run rebuilt in this process (CPU, one rank) from a checkpoint or a run directory,
    whichever engine and worker count wrote it."""
    ckpt = checkpoint_dir(path)
    if ckpt is None:
        raise ConfigError(f"{path}: no checkpoint here (no state.json in it or in {CHECKPOINT}/)")
    cfg = checkpoint_config(ckpt)
    one = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(
        update={"workers": 1, "engine": "ddp", "use_gpu": False}),
        "model": cfg.model.model_copy(update={"compile": False})})  # saved or scored, not trained
    run = setup(one, data=False)
    load_run_checkpoint(run, ckpt)
    run.cfg = cfg  # the run's own config (workers, engine) goes into the outputs
    return run


def merged_model(run: Run):
    """The trained model as a plain transformers model: W_T plus the live adapter, merged
    (the run's peft model is consumed)."""
    model = run.model.merge_and_unload() if run.cfg.method != "full" else run.model
    model.generation_config.eos_token_id = model.generation_config.eos_token_id or run.tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = run.tokenizer.pad_token_id
    return model


def save_merged(run: Run, directory: Path, dtype: str | None = None, max_shard_size: str | None = None) -> Path:
    """A Hugging Face model directory (``from_pretrained``, lm-eval ``--model hf``, vLLM): in the
    run's dtype or ``dtype``, in safetensors shards of ``max_shard_size`` (transformers' default)."""
    from plora_ray.run.models import DTYPES

    model = merged_model(run)
    if dtype is not None:
        model.to(DTYPES[dtype])
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), safe_serialization=True, **shards)  # handles tied embeddings
    run.tokenizer.save_pretrained(str(directory))
    return directory


def summary(run: Run, **extra) -> dict:
    h = run.history
    out = {"method": run.cfg.method, "steps": run.clock.steps, "samples": run.clock.samples,
           "workers": run.cfg.distributed.workers, "engine": run.cfg.distributed.engine,
           "unloads": len(run.unloads), "first_loss": h[0]["loss"] if h else None,
           "final_loss": h[-1]["loss"] if h else None,
           "accumulated_rank_mean": run.unloads[-1].mean_rank if run.unloads else 0.0,
           "merged_model": MERGED if run.cfg.save_merged else None}
    if run.evals:
        out["last_eval"] = run.evals[-1]
    if run.cfg.method == "plora":
        out["adapter_note"] = ADAPTER_NOTE
    return {**out, **extra}


def write_run_dir(run: Run, out: str | Path, **extra) -> dict:
    """Everything but the checkpoint (written during training); safetensors/json/yaml only.
    Consumes ``run`` (the adapter is merged). Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml(run.cfg))
    with open(out / "metrics.jsonl", "w") as f:
        for rec in run.history:
            f.write(json.dumps(rec) + "\n")
        for e in run.unloads:
            f.write(json.dumps(event_record(e)) + "\n")
        for rec in run.evals:
            f.write(json.dumps({"event": "eval", **rec}) + "\n")
    if run.cfg.method != "full":
        run.model.save_pretrained(str(out / "adapter"), safe_serialization=True)
        if run.cfg.method == "plora":
            (out / "adapter" / "README.txt").write_text(ADAPTER_NOTE + "\n")
    if run.unloader is not None and run.unloader.ledger is not None:
        run.unloader.ledger.save(out / "ledger")
    run.tokenizer.save_pretrained(str(out / "tokenizer"))
    if run.cfg.save_merged:
        save_merged(run, out / MERGED)
    result = summary(run, **extra)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def load_trained(path: str | Path, dtype: str | None = None):
    """(model, tokenizer) of a trained run: its merged/ directory if written, else rebuilt
    from its checkpoint (a run directory or a bare checkpoint, e.g. a sweep's best)."""
    from plora_ray.config.schema import ModelConfig
    from plora_ray.run.models import DTYPES, load_base

    p = Path(path).expanduser()
    if (p / MERGED / "config.json").is_file():
        return load_base(ModelConfig(name_or_path=str(p / MERGED), dtype=dtype or run_dtype(p)))
    run = restore_run(p)
    model = merged_model(run)
    model.to(DTYPES[dtype or run.cfg.model.dtype])
    return model.eval(), run.tokenizer


def run_dtype(path: Path) -> str:
    f = path / "config.yaml"
    cfg = yaml.safe_load(f.read_text()) if f.is_file() else {}
    return ((cfg or {}).get("model") or {}).get("dtype", "float32")


def is_run_output(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / MERGED / "config.json").is_file() or checkpoint_dir(p) is not None


def load_model(name: str, dtype: str | None = None):
    """(model, tokenizer) for a model name/dir, a train output dir or a checkpoint dir."""
    from plora_ray.config.schema import ModelConfig
    from plora_ray.run.models import load_base

    run_dir = Path(name).expanduser()
    if run_dir.is_dir() and is_run_output(run_dir):
        return load_trained(run_dir, dtype)
    if (run_dir / "config.yaml").is_file() and (run_dir / "merged.safetensors").is_file():
        # the layout of runs written before merged/ existed
        from safetensors.torch import load_model as load_weights

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        model_cfg = ModelConfig(**cfg.get("model", {}))
        if dtype:
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
        model, tokenizer = load_base(model_cfg)
        load_weights(model, str(run_dir / "merged.safetensors"))
        return model, tokenizer
    return load_base(ModelConfig(name_or_path=name, dtype=dtype or "float32"))


def unique_dir(path: Path) -> Path:
    """``path`` if unused, else ``path-2``, ``path-3``... (never overwrite a run)."""
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while Path(f"{path}-{n}").exists():
        n += 1
    return Path(f"{path}-{n}")


def check_resume(cfg: RunConfig, out: Path) -> None:
    """Before any work: is there something to continue in ``out``?"""
    ray_run = cfg.distributed.workers > 1 or cfg.distributed.engine != "ddp"
    if ray_run and not (out / "ray_run_name").is_file():
        raise ConfigError(f"--resume: {out} holds no Ray run (no ray_run_name): check --output, or "
                          "drop --resume to start a new run")
    if not ray_run and checkpoint_dir(out / CHECKPOINT) is None:
        raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINT}: check --output, or drop "
                          "--resume to start a new run")
