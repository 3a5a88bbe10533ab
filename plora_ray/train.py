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
import shutil
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
from .engines import make_engine
from .models import build_model
from .preflight import check_run
from .plora import PeriodicUnloader, StageLR, UnloadClock, UnloadEvent, make_scheduler


@dataclass
class Run:
    cfg: RunConfig
    engine: object  # engines.TorchEngine | engines.DeepSpeedEngine
    tokenizer: object
    examples: list
    steps: list  # the global step plan: steps -> micro-batches -> example indices
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clock: UnloadClock
    unloader: PeriodicUnloader | None
    rank: int = 0
    world: int = 1
    start_step: int = 0  # > 0 after resuming from a checkpoint
    history: list = field(default_factory=list)  # per-step dicts
    unloads: list = field(default_factory=list)  # UnloadEvent

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


def setup(cfg: RunConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Run:
    """Build everything a run needs; identical on every data-parallel rank."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg)
    examples = load_examples(cfg.data.train_files, tokenizer, cfg.data.max_length)
    # one global plan; each rank takes its share of every step's micro-batches
    plan = StepPlan(len(examples), cfg.data.micro_batch_size, cfg.data.gradient_accumulation_steps * world,
                    cfg.data.epochs, cfg.seed, cfg.data.shuffle)
    steps = plan.steps()[: cfg.data.max_steps]
    engine = make_engine(model, cfg, device or torch.device("cpu"), rank, world)
    o, p = cfg.optim, cfg.plora
    global_batch = cfg.data.micro_batch_size * cfg.data.gradient_accumulation_steps * world
    if cfg.method == "plora" and p.scheduler_on_unload == "restart":
        stage_steps = p.unload_every_steps or math.ceil(p.unload_every_samples / global_batch)
        horizon = min(stage_steps, len(steps))
    else:
        horizon = len(steps)
    schedule = StageLR(o.scheduler, o.warmup_steps, horizon,
                       p.scheduler_on_unload if cfg.method == "plora" else "continue",
                       p.rewarmup_steps if cfg.method == "plora" else 0)
    scheduler = make_scheduler(engine.optimizer, schedule)
    unloader = None
    if cfg.method == "plora":
        unloader = PeriodicUnloader.from_config(engine.module, engine.optimizer, scheduler, p, cfg.lora,
                                                cfg.seed, access=engine.access)
        clock = unloader.clock
    else:
        clock = UnloadClock()  # never fires; counts samples and steps
    return Run(cfg, engine, tokenizer, examples, steps, scheduler, clock, unloader, rank, world)


def causal_lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_step(run: Run, micro_batches: list[list[int]]) -> dict:
    """One optimizer step over the global step's micro-batches (this rank's share).

    The loss is the mean over all labelled tokens of the global step, so gradient
    accumulation, a short last batch and any number of workers weigh tokens equally.
    """
    engine, pad = run.engine, run.tokenizer.pad_token_id
    mine = micro_batches[run.rank::run.world]
    batches = [{k: v.to(engine.device) for k, v in collate([run.examples[i] for i in mb], pad).items()}
               for mb in mine]
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_tokens = engine.all_reduce_sum([local_tokens])[0]
    weight = run.world / max(n_tokens, 1)
    if not batches:  # a short last step can leave a rank without data: it still joins the reduce
        first = [run.examples[i] for i in micro_batches[0][:1]]
        batches, weight = [{k: v.to(engine.device) for k, v in collate(first, pad).items()}], 0.0
    run.model.train()
    loss_local = 0.0
    for i, b in enumerate(batches):
        with engine.accumulating(last=i == len(batches) - 1):
            loss_sum, _ = causal_lm_loss_sum(engine.model, b)
            engine.backward(loss_sum * weight)
        loss_local += loss_sum.item() if weight else 0.0
    lr = engine.optimizer.param_groups[0]["lr"]
    engine.step()
    run.scheduler.step()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) if weight else 0
    loss_total, tokens = engine.all_reduce_sum([loss_local, tokens])
    samples = sum(len(mb) for mb in micro_batches)
    return {"loss": loss_total / max(n_tokens, 1), "lr": lr, "samples": samples, "tokens": tokens}


@torch.no_grad()
def probe_logits(run: Run) -> torch.Tensor:
    """Logits on a fixed batch (the first examples): to measure what an unload changes."""
    batch = collate(run.examples[: run.cfg.data.micro_batch_size], run.tokenizer.pad_token_id)
    was_training = run.model.training
    run.model.eval()
    logits = run.engine.model(input_ids=batch["input_ids"].to(run.engine.device),
                              attention_mask=batch["attention_mask"].to(run.engine.device)).logits
    run.model.train(was_training)
    return logits.float()


def fit(run: Run, on_step=None, on_unload=None, on_checkpoint=None, progress: bool = True) -> Run:
    """Train from ``run.start_step`` to the end of the plan.

    ``on_checkpoint(run, final)`` is called every ``checkpoint_every_steps`` and once at the
    end, on every rank (checkpointing is collective).
    """
    progress = progress and run.rank == 0
    bar = tqdm(total=len(run.steps), initial=run.start_step, desc=run.cfg.name, disable=not progress,
               dynamic_ncols=True)
    try:
        _fit_steps(run, bar, on_step, on_unload, on_checkpoint, progress)
    finally:
        bar.close()
    return run


def _fit_steps(run: Run, bar, on_step, on_unload, on_checkpoint, progress: bool) -> None:
    every = run.cfg.checkpoint_every_steps
    for index in range(run.start_step, len(run.steps)):
        t0 = time.perf_counter()
        out = train_step(run, run.steps[index])
        event = None
        if run.clock.step(out["samples"]) and run.unloader is not None:
            before = probe_logits(run) if run.cfg.plora.measure_output_change else None
            event = run.unloader.unload()
            if before is not None:
                after = probe_logits(run)
                event.output_change = float((after - before).abs().max() / before.abs().max())
        dt = time.perf_counter() - t0
        first = run.history[0]["loss"] if run.history else out["loss"]
        limit = run.cfg.diverge_factor * first
        if not math.isfinite(out["loss"]) or out["loss"] > limit:
            raise FloatingPointError(f"loss {out['loss']:.4g} at step {run.clock.steps} "
                                     f"(first step: {first:.4g}, limit {limit:.4g})")
        rec = {"step": run.clock.steps, "loss": out["loss"], "lr": out["lr"],
               "samples": run.clock.samples, "tokens_per_s": out["tokens"] / dt}
        run.history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", samples=rec["samples"])
        if progress and rec["step"] % run.cfg.log_every_steps == 0:
            tqdm.write(f"step {rec['step']}: loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                       f"samples {rec['samples']}  {rec['tokens_per_s']:.0f} tok/s")
        if on_step:
            on_step(rec)
        if event is not None:
            run.unloads.append(event)
            if progress:
                change = "" if event.output_change is None else f", output change {event.output_change:.1e}"
                tqdm.write(f"unload {event.stage} at step {event.step} ({event.samples} samples): "
                           f"accumulated rank mean {event.mean_rank:.1f}, max {event.max_rank} "
                           f"({event.seconds * 1000:.0f} ms{change})")
            if on_unload:
                on_unload(event)
        final = index == len(run.steps) - 1
        if on_checkpoint and (final or (every and rec["step"] % every == 0)):
            on_checkpoint(run, final)


def evaluate_run(run: Run) -> dict[str, float]:
    """The configured benchmarks on the model as it is now, as ``eval/<task>/<metric>``."""
    e = run.cfg.eval
    if not e.tasks:
        return {}
    from .evaluation import evaluate

    res = evaluate(run.model, run.tokenizer, list(e.tasks), e.limit, e.prompt_style, e.batch_size,
                   e.num_fewshot, limit_mode=e.limit_mode, seed=run.cfg.seed, max_new_tokens=e.max_new_tokens)
    return {f"eval/{k}": float(v) for k, v in res.items() if "/subject/" not in k and not k.endswith("/n")}


def event_record(e: UnloadEvent) -> dict:
    return {"event": "unload", "stage": e.stage, "step": e.step, "samples": e.samples,
            "mean_rank": e.mean_rank, "max_rank": e.max_rank, "seconds": e.seconds,
            "output_change": e.output_change, "ranks": e.ranks}


def unique_dir(path: Path) -> Path:
    """``path`` if unused, else ``path-2``, ``path-3``... (never overwrite a run)."""
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while Path(f"{path}-{n}").exists():
        n += 1
    return Path(f"{path}-{n}")


def save_outputs(run: Run, out: Path, evals: list[dict] = ()) -> None:
    """Config, metrics, adapter, ledger and merged weights: safetensors/json/yaml only."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False))
    with open(out / "metrics.jsonl", "w") as f:
        for rec in run.history:
            f.write(json.dumps(rec) + "\n")
        for e in run.unloads:
            f.write(json.dumps(event_record(e)) + "\n")
        for rec in evals:
            f.write(json.dumps({"event": "eval", **rec}) + "\n")
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


def finish_distributed(result, out: Path) -> dict:
    """Outputs of a Ray run: the final checkpoint, metrics.jsonl and summary.json."""
    if result.error:
        raise RuntimeError(f"distributed run failed: {result.error}")
    final = out / "checkpoint"
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, final, dirs_exist_ok=True)
    state = json.loads((final / "state.json").read_text())
    with open(out / "metrics.jsonl", "w") as f:
        for rec in state["history"]:
            f.write(json.dumps(rec) + "\n")
        for e in state["unloads"]:
            f.write(json.dumps({"event": "unload", **e}) + "\n")
    history, unloads = state["history"], state["unloads"]
    summary = {"method": state["method"], "steps": state["step"], "samples": state["clock"]["samples"],
               "unloads": len(unloads), "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "replicas_identical": (result.metrics or {}).get("replicas_identical")}
    if unloads:
        ranks = unloads[-1]["ranks"]
        summary["accumulated_rank_mean"] = sum(ranks.values()) / max(1, len(ranks))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_cli(cfg: RunConfig, out: Path, resume: bool, address: str | None) -> str:
    d = cfg.distributed
    if d.workers == 1 and d.engine == "ddp" and not resume:
        run = setup(cfg)
        print(f"{cfg.method}: {sum(p.numel() for p in run.model.parameters() if p.requires_grad):,} "
              f"trainable parameters, {len(run.examples)} examples, {len(run.steps)} steps, "
              f"global batch {cfg.global_batch_size}, output {out}")
        evals = []

        def on_checkpoint(run, final):
            if cfg.eval.tasks:
                evals.append({"step": run.clock.steps, **evaluate_run(run)})
                tqdm.write(f"eval at step {run.clock.steps}: " + ", ".join(
                    f"{k.removeprefix('eval/')} {v:.3f}" for k, v in evals[-1].items() if k != "step"))

        fit(run, on_checkpoint=on_checkpoint)
        save_outputs(run, out, evals)
        return f"{run.clock.steps} steps, {len(run.unloads)} unloads"
    from .distributed import run_distributed

    out.mkdir(parents=True, exist_ok=True)
    name_file = out / "ray_run_name"
    if resume and name_file.exists():
        name = name_file.read_text().strip()
    else:
        name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        name_file.write_text(name)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"{cfg.method} on {d.workers} worker(s), engine {d.engine}"
          f"{f' ZeRO-{d.zero_stage}' if d.engine == 'deepspeed' else ''}, global batch "
          f"{cfg.global_batch_size}, Ray run {name}, output {out}")
    summary = finish_distributed(run_distributed(cfg, out, name, address), out)
    return (f"{summary['steps']} steps, {summary['unloads']} unloads, replicas identical: "
            f"{summary['replicas_identical']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run YAML (see examples/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set plora.momentum=0.1")
    parser.add_argument("--output", help="output directory (default: the config's output_dir)")
    parser.add_argument("--workers", type=int, help="Ray Train data-parallel workers (distributed.workers)")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], help="distributed.engine")
    parser.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage (distributed.zero_stage)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the Ray run in --output from its last checkpoint")
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    args = parser.parse_args(argv)
    flags = {"distributed.workers": args.workers, "distributed.engine": args.engine,
             "distributed.zero_stage": args.zero}
    overrides = args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_run_config(args.config, overrides)
        if args.resume and not args.output:
            raise ConfigError("--resume needs --output DIR: the directory of the run to continue")
        out = Path(args.output or cfg.output_dir)
        check_run(cfg, out, args.resume)  # preflight: paths, model, data, before any work
        out = out if args.resume else unique_dir(out)
        done = run_cli(cfg, out, args.resume, args.address)
    except (ConfigError, DataError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: training diverged: {exc}: lower optim.lr or raise plora.momentum", file=sys.stderr)
        return 3
    except Exception as exc:  # a Ray worker group failure: its own log above has the details
        if type(exc).__module__.startswith("ray"):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: distributed run failed ({first}); the worker logs above say why", file=sys.stderr)
            return 1
        raise
    print(f"done: {done}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
