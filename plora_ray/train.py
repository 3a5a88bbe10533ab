"""One training run, read top to bottom: config -> model -> data -> optimizer -> loop -> save.

    python -m plora_ray.train examples/tiny.yaml
    python -m plora_ray.train examples/tiny.yaml --set plora.momentum=0.1 --set lora.rank=1

Single process (CPU or one GPU). The loop's pieces (``setup``, ``train_step``, ``fit``)
are what the distributed workers call too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_model
from tqdm import tqdm

from .assets import AssetError
from .config import ConfigError, RunConfig, load_run_config
from .data import DataError, StepPlan, collate, load_examples
from .models import build_model
from .plora import PeriodicUnloader, StageLR, UnloadClock, UnloadEvent, make_scheduler


@dataclass
class Run:
    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: object
    examples: list
    steps: list  # the step plan: steps -> micro-batches -> example indices
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clock: UnloadClock
    unloader: PeriodicUnloader | None
    history: list = field(default_factory=list)  # per-step dicts
    unloads: list = field(default_factory=list)  # UnloadEvent


def setup(cfg: RunConfig) -> Run:
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg)
    examples = load_examples(cfg.data.train_files, tokenizer, cfg.data.max_length)
    plan = StepPlan(len(examples), cfg.data.micro_batch_size, cfg.data.gradient_accumulation_steps,
                    cfg.data.epochs, cfg.seed, cfg.data.shuffle)
    steps = plan.steps()[: cfg.data.max_steps]
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    p = cfg.plora
    if cfg.method == "plora" and p.scheduler_on_unload == "restart":
        stage_steps = p.unload_every_steps or math.ceil(p.unload_every_samples / cfg.global_batch_size)
        horizon = min(stage_steps, len(steps))
    else:
        horizon = len(steps)
    schedule = StageLR(o.scheduler, o.warmup_steps, horizon,
                       p.scheduler_on_unload if cfg.method == "plora" else "continue",
                       p.rewarmup_steps if cfg.method == "plora" else 0)
    scheduler = make_scheduler(optimizer, schedule)
    unloader = None
    if cfg.method == "plora":
        unloader = PeriodicUnloader.from_config(model, optimizer, scheduler, p, cfg.lora, cfg.seed)
        clock = unloader.clock
    else:
        clock = UnloadClock()  # never fires; counts samples and steps
    return Run(cfg, model, tokenizer, examples, steps, optimizer, scheduler, clock, unloader)


def causal_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_step(run: Run, micro_batches: list[list[int]]) -> dict:
    """One optimizer step over its micro-batches; the loss is the mean over all labelled
    tokens of the step (so accumulation and a short last batch weigh tokens equally)."""
    model, pad = run.model, run.tokenizer.pad_token_id
    batches = [collate([run.examples[i] for i in mb], pad) for mb in micro_batches]
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model.train()
    total = 0.0
    for b in batches:
        loss_sum, _ = causal_lm_loss_sum(model, b)
        (loss_sum / max(n_tokens, 1)).backward()
        total += loss_sum.item()
    if run.cfg.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], run.cfg.optim.max_grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    samples = sum(len(mb) for mb in micro_batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"loss": total / max(n_tokens, 1), "lr": lr, "samples": samples, "tokens": tokens}


def fit(run: Run, on_step=None, on_unload=None, progress: bool = True) -> Run:
    bar = tqdm(run.steps, desc=run.cfg.name, disable=not progress, dynamic_ncols=True)
    for micro_batches in bar:
        t0 = time.perf_counter()
        out = train_step(run, micro_batches)
        if run.unloader is not None:
            event = run.unloader.after_step(out["samples"])
        else:
            run.clock.step(out["samples"])
            event = None
        dt = time.perf_counter() - t0
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"loss became {out['loss']} at step {run.clock.steps}")
        rec = {"step": run.clock.steps, "loss": out["loss"], "lr": out["lr"],
               "samples": run.clock.samples, "tokens_per_s": out["tokens"] / dt}
        run.history.append(rec)
        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", samples=rec["samples"])
        if progress and rec["step"] % run.cfg.log_every_steps == 0:
            tqdm.write(f"step {rec['step']}: loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                       f"samples {rec['samples']}  {rec['tokens_per_s']:.0f} tok/s")
        if on_step:
            on_step(rec)
        if event is not None:
            run.unloads.append(event)
            if progress:
                tqdm.write(f"unload {event.stage} at step {event.step} ({event.samples} samples): "
                           f"accumulated rank mean {event.mean_rank:.1f}, max {event.max_rank} "
                           f"({event.seconds * 1000:.0f} ms)")
            if on_unload:
                on_unload(event)
    return run


def event_record(e: UnloadEvent) -> dict:
    return {"event": "unload", "stage": e.stage, "step": e.step, "samples": e.samples,
            "mean_rank": e.mean_rank, "max_rank": e.max_rank, "seconds": e.seconds, "ranks": e.ranks}


def unique_dir(path: Path) -> Path:
    """``path`` if unused, else ``path-2``, ``path-3``... (never overwrite a run)."""
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while Path(f"{path}-{n}").exists():
        n += 1
    return Path(f"{path}-{n}")


def save_outputs(run: Run, out: Path) -> None:
    """Config, metrics, adapter, ledger and merged weights: safetensors/json/yaml only."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False))
    with open(out / "metrics.jsonl", "w") as f:
        for rec in run.history:
            f.write(json.dumps(rec) + "\n")
        for e in run.unloads:
            f.write(json.dumps(event_record(e)) + "\n")
    model = run.model
    if run.cfg.method != "full":
        model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    if run.unloader is not None and run.unloader.ledger is not None:
        run.unloader.ledger.save(out / "ledger.safetensors")
    merged = model.merge_and_unload() if run.cfg.method != "full" else model
    save_model(merged, str(out / "merged.safetensors"))  # handles tied embeddings
    run.tokenizer.save_pretrained(str(out / "tokenizer"))
    summary = {
        "method": run.cfg.method, "steps": run.clock.steps, "samples": run.clock.samples,
        "unloads": len(run.unloads), "final_loss": run.history[-1]["loss"] if run.history else None,
        "first_loss": run.history[0]["loss"] if run.history else None,
        "accumulated_rank_mean": run.unloads[-1].mean_rank if run.unloads else 0.0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run YAML (see examples/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set plora.momentum=0.1")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        out = unique_dir(Path(args.output or cfg.output_dir))
        run = setup(cfg)
        print(f"{cfg.method}: {sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} "
              f"trainable parameters, {len(run.examples)} examples, {len(run.steps)} steps, "
              f"global batch {cfg.global_batch_size}, output {out}")
        fit(run)
        save_outputs(run, out)
    except (ConfigError, DataError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: training diverged: {exc}: lower optim.lr or raise plora.momentum", file=sys.stderr)
        return 3
    print(f"done: {run.clock.steps} steps, {len(run.unloads)} unloads; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
