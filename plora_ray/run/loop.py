"""The training loop, read top to bottom: setup -> train_step -> fit (unloads, evaluation and
checkpoint points). No CLI, no Ray: the one-process run (``run/local.py``) and the Ray Train
worker (``ray/worker.py``) both drive a run through these functions.

    run = setup(cfg, rank, world, device)
    fit(run, on_step=..., on_unload=..., on_checkpoint=...)  # on_checkpoint(run, final, scores)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from plora_ray.config.names import IGNORE
from plora_ray.config.schema import RunConfig
from plora_ray.core.clock import UnloadClock, lap
from plora_ray.core.schedule import StageLR, make_scheduler
from plora_ray.core.unloader import PeriodicUnloader, UnloadEvent
from plora_ray.run.data import StepPlan, collate, load_examples, pack
from plora_ray.run.engines import make_engine
from plora_ray.run.loss import loss_positions, loss_sum, packing_isolated
from plora_ray.run.compiled import compile_layers
from plora_ray.run.models import build_model
from plora_ray.run.unloading import build_unloader


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
    evals: list = field(default_factory=list)  # {"step": n, "eval/<task>/<metric>": v} per checkpoint
    heldout: list = field(default_factory=list)  # held-out examples, scored at every checkpoint
    train_eval: list = field(default_factory=list)  # eval.train_loss's training examples, likewise
    items: dict = field(default_factory=dict)  # the last checkpoint's per-item results (items_record)
    # wall seconds per phase of this process: model_load, tokenise, engine (setup), steps,
    # unload, evaluation, checkpoint (fit); bench/sweep_efficiency.py reads them from MLflow
    timings: dict = field(default_factory=dict)
    ranks_printed: int = 0  # unloads whose accumulated rank (measured in the background) was printed

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


def warn_slow_bf16(cfg: RunConfig, device: torch.device, rank: int = 0) -> None:
    """One line on stderr when a bf16 backbone will train on a CPU without fast bf16 matmuls."""
    from plora_ray.config.hardware import fast_bf16_cpu

    if cfg.model.dtype == "bfloat16" and device.type == "cpu" and rank == 0 and not fast_bf16_cpu():
        print("warning: field 'model.dtype' bfloat16 on a CPU without fast bf16 matmuls (no AVX-512 "
              "or AMX: ~50x slower than float32 here); set model.dtype: auto (float32 here) or "
              "float32", file=sys.stderr, flush=True)


def check_packing(cfg: RunConfig, engine, examples, pad_id: int, rank: int) -> None:
    """Say on stderr when the model's attention does not keep packed examples apart."""
    if not packing_isolated(engine.model, examples, pad_id, engine.device) and rank == 0:
        print(f"warning: field 'data.packing': {cfg.model.attn_implementation} attention of this model "
              "does not keep packed examples apart (each attends to those before it in its row; its "
              "loss stays its own); use a transformers model with sdpa, eager or flash_attention_2 "
              "(padding-free position ids), or data.packing: false", file=sys.stderr, flush=True)


def setup(cfg: RunConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
          data: bool = True) -> Run:
    """Build everything a run needs; identical on every data-parallel rank.

    ``data=False`` skips reading the training data (a run restored only to be saved or
    evaluated: the checkpoint brings the schedule's state).
    """
    torch.manual_seed(cfg.seed)
    warn_slow_bf16(cfg, device or torch.device("cpu"), rank)
    t0 = time.perf_counter()
    model, tokenizer = build_model(cfg, world)  # world: ZeRO-3 builds it partitioned
    t1 = time.perf_counter()
    d = cfg.data
    examples = load_examples(d.sources or d.train_files, tokenizer, d.max_length, d.cache_dir,
                             d.tokenize_cache, d.num_proc) if data else []
    heldout, train_eval = [], []
    if data:  # rows kept out of training are chosen before the plan, identically on every rank
        from plora_ray.evaluation.heldout import prepare_heldout, prepare_train_eval

        train_eval = prepare_train_eval(cfg, examples)
        examples, heldout = prepare_heldout(cfg, tokenizer, examples)
    t2 = time.perf_counter()
    # one global plan; each rank takes its share of every step's micro-batches
    plan = StepPlan(len(examples), cfg.data.micro_batch_size, cfg.data.gradient_accumulation_steps * world,
                    cfg.data.epochs, cfg.seed, cfg.data.shuffle,
                    examples.lengths() if cfg.data.group_by_length else None)
    steps = plan.steps()[: cfg.data.max_steps]
    engine = make_engine(model, cfg, device or torch.device("cpu"), rank, world)
    if d.packing and len(examples) >= 2:
        check_packing(cfg, engine, examples, tokenizer.pad_token_id, rank)
    if cfg.model.compile:  # refused by preflight first where the model names no decoder layer
        compile_layers(model, cfg.model.name_or_path)
    timings = {"model_load": t1 - t0, "tokenise": t2 - t1, "engine": time.perf_counter() - t2}
    o, p = cfg.optim, cfg.plora
    global_batch = cfg.samples_per_step(world)
    if cfg.method == "plora" and p.scheduler_on_unload == "restart":
        stage_steps = p.unload_every_steps or math.ceil(p.unload_every_samples / global_batch)
        horizon = min(stage_steps, len(steps))
    else:
        horizon = len(steps)
    schedule = StageLR(o.scheduler, o.warmup_steps, max(horizon, 1),
                       p.scheduler_on_unload if cfg.method == "plora" else "continue",
                       p.rewarmup_steps if cfg.method == "plora" else 0)
    scheduler = make_scheduler(engine.optimizer, schedule)
    unloader = None
    if cfg.method == "plora":
        unloader = build_unloader(engine.module, engine.optimizer, scheduler, p, cfg.lora, cfg.seed,
                                  access=engine.access)
        clock = unloader.clock
    else:
        clock = UnloadClock()  # never fires; counts samples and steps
    return Run(cfg, engine, tokenizer, examples, steps, scheduler, clock, unloader, rank, world,
               heldout=heldout, train_eval=train_eval, timings=timings)


def rank_share(micro_batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], int]:
    """This rank's micro-batches of a global step, and how many zero-weight ones it adds.

    Every rank runs the same number of forward/backward passes in every step: ZeRO reduces
    (and ZeRO-3 gathers) in every pass, DDP in the last one, so a rank with fewer
    micro-batches than another (a short last step) pads with passes that weigh nothing.
    """
    mine = micro_batches[rank::world]
    passes = -(-len(micro_batches) // world)
    return mine, passes - len(mine)


def train_step(run: Run, micro_batches: list[list[int]]) -> dict:
    """One optimizer step over the global step's micro-batches (this rank's share).

    The loss is the mean over all labelled tokens of the global step, so gradient
    accumulation, a short last batch and any number of workers weigh tokens equally.
    """
    engine, pad = run.engine, run.tokenizer.pad_token_id
    d = run.cfg.data

    def host_batch(indices):  # counts and loss positions on the host: no device sync
        rows = [run.examples[i] for i in indices]
        batch = pack(rows, d.max_length, pad) if d.packing else collate(rows, pad)
        batch["positions"], batch["targets"] = loss_positions(batch["labels"])
        return batch

    def on_device(batch):
        non_blocking = engine.device.type == "cuda"
        return {k: v.to(engine.device, non_blocking=non_blocking) for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "position_ids", "positions", "targets")}

    mine, padding = rank_share(micro_batches, run.rank, run.world)
    batches = [host_batch(mb) for mb in mine]
    local_tokens = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    n_tokens = engine.all_reduce_sum([local_tokens])[0]
    weight = run.world / max(n_tokens, 1)
    # padding: one example (the step's first), loss times 0, so its gradient is exactly zero
    weighted = [(b, weight) for b in batches] + [(host_batch(micro_batches[0][:1]), 0.0)] * padding
    run.model.train()
    loss_local, tokens = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    for i, (b, w) in enumerate(weighted):
        with engine.accumulating(last=i == len(weighted) - 1):
            loss = loss_sum(engine.model, on_device(b))
            engine.backward(loss * w)
        if w:
            loss_local += loss.detach().double()
            tokens += int(b["tokens"])
    lr = engine.optimizer.param_groups[0]["lr"]
    engine.step()
    run.scheduler.step()
    loss_total, tokens = engine.all_reduce_sum([loss_local.item(), tokens])  # the step's one sync
    samples = sum(len(mb) for mb in micro_batches)
    return {"loss": loss_total / max(n_tokens, 1), "lr": lr, "samples": samples, "tokens": tokens}


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # model.compile: the training steps only
def probe_logits(run: Run) -> torch.Tensor:
    """Logits on a fixed batch (the first examples): to measure what an unload changes."""
    batch = collate(run.examples[: run.cfg.data.micro_batch_size], run.tokenizer.pad_token_id)
    was_training = run.model.training
    run.model.eval()
    logits = run.engine.model(input_ids=batch["input_ids"].to(run.engine.device),
                              attention_mask=batch["attention_mask"].to(run.engine.device)).logits
    run.model.train(was_training)
    return logits.float()


@torch.compiler.set_stance("force_eager")  # model.compile: other shapes, no grad: eager
def evaluate_run(run: Run, final: bool = False) -> dict[str, float]:
    """Held-out loss, training-set loss and the configured benchmarks on the model as it is now.

    Called on every rank at each checkpoint point: each rank scores its share of the items
    and all get the gathered result (under ZeRO-3 the ranks' forward calls are kept in
    lockstep, since each one gathers the partitioned weights). Returns
    ``eval/<task>/<metric>`` and ``..._stderr``; the per-item results go to ``run.items``.
    """
    from plora_ray.evaluation import evaluate_checkpoint

    d = run.cfg.distributed
    zero3 = d.engine == "deepspeed" and d.zero_stage == 3
    metrics, run.items = evaluate_checkpoint(run.model, run.tokenizer, run.cfg.eval, run.heldout,
                                             rank=run.rank, world=run.world, lockstep=zero3, final=final,
                                             train=run.train_eval)
    return metrics


def fit(run: Run, on_step=None, on_unload=None, on_checkpoint=None, progress: bool = True) -> Run:
    """Train from ``run.start_step`` to the end of the plan.

    At every ``checkpoint_every_steps`` and at the end, on every rank (both are collective):
    the configured benchmarks are scored (``run.evals``), then ``on_checkpoint(run, final, scores)``
    gets what was just measured (``eval/<task>/<metric>`` -> value; empty when nothing is scored).
    ``on_step(rec)`` sees each step's record, ``on_unload(event)`` each unload.
    """
    progress = progress and run.rank == 0
    # no bar where no terminal shows it (Ray workers, logs): each refresh would become a line;
    # the step lines (log_every_steps) are printed either way
    bar = tqdm(total=len(run.steps), initial=run.start_step, desc=run.cfg.name,
               disable=not progress or not sys.stderr.isatty(),
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
        t = lap(run.timings, "steps", t0)
        event = None
        if run.clock.step(out["samples"]) and run.unloader is not None:
            before = probe_logits(run) if run.cfg.plora.measure_output_change else None
            event = run.unloader.unload()
            if before is not None:
                after = probe_logits(run)
                event.output_change = float((after - before).abs().max() / before.abs().max())
            lap(run.timings, "unload", t)
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
                tqdm.write(f"unload {event.stage} at step {event.step} ({event.samples} samples, "
                           f"{event.seconds * 1000:.0f} ms{change})")
            if on_unload:
                on_unload(event)
        if progress:
            print_ranks(run)
        final = index == len(run.steps) - 1
        if final or (every and rec["step"] % every == 0):
            checkpoint_point(run, final, on_checkpoint, progress)


def print_ranks(run: Run, wait: bool = False) -> None:
    """Print the accumulated rank of the unloads whose background measurement finished (in
    order; ``wait``: all of them)."""
    while run.ranks_printed < len(run.unloads):
        e = run.unloads[run.ranks_printed]
        if not (wait or e.ranks_ready):
            return
        tqdm.write(f"stage {e.stage} (unload at step {e.step}): accumulated rank mean {e.mean_rank:.1f}, "
                   f"max {e.max_rank}")
        run.ranks_printed += 1


def checkpoint_point(run: Run, final: bool, on_checkpoint, progress: bool) -> None:
    if progress:
        print_ranks(run, wait=True)
    t = time.perf_counter()
    scores = evaluate_run(run, final)
    t = lap(run.timings, "evaluation", t)
    if scores:
        run.evals.append({"step": run.clock.steps, **scores})
        if progress:
            # MMLU's categories (a few items each here) stay in MLflow, out of the console line
            tqdm.write(f"eval at step {run.clock.steps}: " + ", ".join(
                f"{k.removeprefix('eval/')} {v:.3f} ± {scores.get(k + '_stderr', float('nan')):.3f}"
                for k, v in scores.items() if not k.endswith("_stderr")
                and not (k.startswith("eval/mmlu/") and k != "eval/mmlu/acc")))
    if on_checkpoint:
        on_checkpoint(run, final, scores)
    lap(run.timings, "checkpoint", t)


def event_record(e: UnloadEvent) -> dict:
    return {"event": "unload", "stage": e.stage, "step": e.step, "samples": e.samples,
            "mean_rank": e.mean_rank, "max_rank": e.max_rank, "seconds": e.seconds,
            "output_change": e.output_change, "ranks": e.ranks}
