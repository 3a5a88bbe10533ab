"""Training throughput of plora_ray's loop against Hugging Face Trainer + PEFT, same run.

    python bench/throughput.py [--rows full|mix] [--steps 4] [--warmup 1] [--dtype bfloat16|float32]
                               [--model smollm2-135m-instruct|tiny]

Both sides: SmolLM2-135M-Instruct (the embedded model), LoRA r 8 / alpha 16 on all seven linear
modules (peft, adapters in fp32), the same tokenised rows (assistant-only labels), micro-batch 4,
sequence length 256, AdamW (same betas, eps, lr, clipping 1.0), constant LR, one process.
plora_ray runs through the CLI's loop (``loop.setup`` + ``loop.train_step``); the Trainer runs
with no evaluation, saving or logging (``report_to=[]``), ``dataloader_num_workers=0``.
The configurations are interleaved step by step in this process, so a machine whose load
changes (a shared one) slows all of them alike: after each Trainer step (timed from its
``on_step_begin`` to its ``on_step_end``, i.e. without fetching its batch) one step of each
plora_ray configuration runs (timed around ``train_step``, collation included). The first
``--warmup`` steps of each configuration are not timed. Figures are medians over steps;
the last line's ratio is the median over the Trainer's steps of (the plora_ray bf16 step run
right after it) / (that Trainer step).

Rows: ``full`` (default) joins consecutive dialogues of the embedded mix into multi-turn
conversations cut at 256 tokens, so every micro-batch is 4 x 256 with no padding;
``mix`` takes the mix's dialogues as they are (mixed lengths: padding), and adds the
length-grouped rows on both sides (``data.group_by_length`` /
``train_sampling_strategy="group_by_length"``).

Configurations (``--dtype bfloat16``, the default): plora_ray with bf16 weights and with fp32
weights; the Trainer with bf16 weights and with fp32 weights + bf16 autocast (``bf16=True``).
With ``--dtype float32`` (a CPU without fast bf16, where ``model.dtype: auto`` picks fp32): both
sides in fp32 only. With ``--rows mix`` each side also runs length-grouped, and plora_ray packed
(``data.packing``). tokens/s counts non-padding tokens. Last line: plora_ray in ``--dtype``,
unpacked and ungrouped, / the Trainer's best (paired step by step).

``--model tiny``: plora_ray's built-in random Llama (``model.name_or_path: tiny``) on both sides,
the Trainer loading it saved with its tokenizer, rows of 1024 tokens: a check that the script runs.
``--compile``: one more plora_ray side, its decoder layers compiled in place (regional
``torch.compile``, the lever the issue lists); its first step, which compiles, is not timed and is
printed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, MICRO, LR = 256, 4, 1e-4
# tokens per row, by base: the tiny Llama's byte-level tokens need its whole context for a row
# to reach the assistant's replies
SEQ_OF = {MODEL: SEQ, "tiny": 1024}


def make_rows(kind: str, n: int, path: str) -> str:
    """A jsonl file of ``n`` dialogues (see the module docstring)."""
    from plora_ray.assets.mix import build_embedded_mix

    mix = [{"messages": r["messages"]} for r in build_embedded_mix("embedded-mix-small")]
    if kind == "mix":
        rows = mix[:n]
    else:  # four dialogues per conversation: well over 256 tokens
        rows = [{"messages": [m for r in mix[4 * i: 4 * i + 4] for m in r["messages"]]} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def model_dir(name: str, tmp: str) -> str:
    """The folder the Trainer loads for ``name``: an embedded model's (fetched and converted once),
    or ``tiny`` as plora_ray builds it (seed 0, the runs' seed) saved with its tokenizer."""
    if name != "tiny":
        from plora_ray.assets.fetch import model_path

        return str(model_path(name))
    from plora_ray.config.schema import ModelConfig
    from plora_ray.run.models import load_base

    model, tok = load_base(ModelConfig(name_or_path="tiny"), seed=0)
    path = os.path.join(tmp, "tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def plora_config(data_file: str, dtype: str, steps: int, group: bool, packing: bool = False,
                 model: str = MODEL, compiled: bool = False):
    from plora_ray.config.io import build_run_config

    return build_run_config({
        "name": "bench-throughput", "method": "lora", "seed": 0,
        "model": {"name_or_path": model, "dtype": dtype, "compile": compiled},
        "lora": {"rank": 8, "alpha": 16, "target_modules": TARGETS},
        "optim": {"lr": LR, "scheduler": "constant"},
        "data": {"train_files": [data_file], "max_length": SEQ_OF[model], "micro_batch_size": MICRO,
                 "gradient_accumulation_steps": 1, "max_steps": steps, "shuffle": True,
                 "group_by_length": group, "packing": packing},
        "eval": {"tasks": [], "heldout": {"files": []}}})


def summary(times: list[float], tokens: list[int]) -> dict:
    """Median over steps (robust to a load spike on a shared machine) and the per-step rates."""
    rates = [n / t for n, t in zip(tokens, times)]
    return {"tokens_per_s": statistics.median(rates), "step_s": statistics.median(times),
            "steps": len(times), "rates": rates}


class PloraSide:
    """A plora_ray run stepped on demand; its steps after ``warmup`` are timed."""

    def __init__(self, data_file: str, dtype: str, steps: int, warmup: int, group: bool = False,
                 packing: bool = False, model: str = MODEL, compiled: bool = False):
        from plora_ray.run.loop import setup

        self.run = setup(plora_config(data_file, dtype, steps, group, packing, model, compiled))
        self.warmup, self.index, self.times, self.tokens, self.first = warmup, 0, [], [], None

    def step(self) -> None:
        from plora_ray.run.loop import train_step

        if self.index >= len(self.run.steps):
            return
        t0 = time.perf_counter()
        out = train_step(self.run, self.run.steps[self.index])
        if self.index == 0:
            self.first = time.perf_counter() - t0  # a compiled side's first step compiles
        if self.index >= self.warmup:
            self.times.append(time.perf_counter() - t0)
            self.tokens.append(out["tokens"])
        self.index += 1

    def result(self) -> dict:
        return summary(self.times, self.tokens)


def time_trainer(path: str, seq: int, data_file: str, dtype: str, autocast: bool, steps: int,
                 warmup: int, group: bool = False, between=()) -> dict:
    """Trainer + PEFT on the model folder ``path``, rows of ``seq`` tokens, for ``steps`` steps;
    after each one, every callable of ``between`` runs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from transformers import AutoTokenizer

    from plora_ray.run.data import collate, load_examples

    tok = AutoTokenizer.from_pretrained(path)
    examples = load_examples([data_file], tok, seq)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    seen = []  # non-padding tokens of each forward pass, in order

    def count(module, args, kwargs):
        seen.append(int(kwargs["attention_mask"].sum()))

    model.register_forward_pre_hook(count, with_kwargs=True)

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.n0 = time.perf_counter(), len(seen)

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            tokens.append(sum(seen[self.n0:]))
            for fn in between:
                fn()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", bf16=autocast, use_cpu=not torch.cuda.is_available(), seed=0,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
            dataloader_num_workers=0, remove_unused_columns=False,
            train_sampling_strategy="group_by_length" if group else "random",
            disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=lambda rows: collate(rows, tok.pad_token_id),
                          callbacks=[Clock()])
        trainer.train()
    return summary(times[warmup:], tokens[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="full", choices=["full", "mix"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each Trainer configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="float32: both sides in fp32 only (no bf16 anywhere: what `model.dtype: "
                             "auto` trains in on a CPU without fast bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time plora_ray with its decoder layers compiled (regional torch.compile; "
                             "its first, untimed step compiles)")
    parser.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"],
                        help="the base on both sides; bench/RESULTS.md's figures: the default; tiny: "
                             "plora_ray's built-in random Llama (a quick check that the script runs)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    tmp = tempfile.mkdtemp()
    path = model_dir(args.model, tmp)  # the Trainer's base, ready before any timing
    per_side = args.steps + args.warmup
    short = "bf16" if args.dtype == "bfloat16" else "fp32"
    trainers = [(f"Trainer+PEFT {short} weights", args.dtype, False, False)]
    if args.dtype == "bfloat16":
        trainers.append(("Trainer+PEFT fp32 + bf16 autocast", "float32", True, False))
    if args.rows == "mix":
        trainers.append((f"Trainer+PEFT {short}, grouped", args.dtype, False, True))
    plora_steps = len(trainers) * per_side  # one step of each plora_ray side after each Trainer step
    n = plora_steps * MICRO + MICRO
    data = make_rows(args.rows, n if args.rows == "full" else max(n, 400), os.path.join(tmp, "rows.jsonl"))
    ours_name = f"plora_ray {short} weights"

    def plora_side(dtype: str, **kw) -> PloraSide:
        return PloraSide(data, dtype, plora_steps, args.warmup, model=args.model, **kw)

    sides = {ours_name: plora_side(args.dtype)}
    if args.dtype == "bfloat16":
        sides["plora_ray fp32 weights"] = plora_side("float32")
    if args.compile:
        sides[f"plora_ray {short}, compiled layers"] = plora_side(args.dtype, compiled=True)
    if args.rows == "mix":
        sides[f"plora_ray {short}, grouped"] = plora_side(args.dtype, group=True)
        sides[f"plora_ray {short}, packed"] = plora_side(args.dtype, packing=True)
    best: dict[str, dict] = {}
    ours = sides[ours_name]
    paired = {}  # Trainer config -> plora_ray bf16 rate / Trainer rate, step by step
    for name, dtype, autocast, group in trainers:
        first = len(ours.tokens)
        best[name] = time_trainer(path, SEQ_OF[args.model], data, dtype, autocast, per_side, args.warmup,
                                  group, between=[side.step for side in sides.values()])
        theirs = best[name]["rates"]
        mine = [n / t for n, t in zip(ours.tokens[first:], ours.times[first:])][-len(theirs):]
        paired[name] = [a / b for a, b in zip(mine, theirs)]
        print(f"{name}: {best[name]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    for name, side in sides.items():
        best[name] = side.result()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    model = "" if args.model == MODEL else f"model {args.model}, "
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{model}rows {args.rows}, micro-batch {MICRO} x {SEQ_OF[args.model]}, steps interleaved, "
          f"{args.warmup} warm-up step(s) per configuration")
    print(f"{'configuration':36} {'tokens/s (median)':>18} {'s/step (median)':>16} {'timed steps':>12}")
    for name, res in best.items():
        print(f"{name:36} {res['tokens_per_s']:18.0f} {res['step_s']:16.2f} {res['steps']:12d}")
    for name, ratios in paired.items():
        print(f"{ours_name} step / the {name} step before it: "
              + " ".join(f"{r:.2f}" for r in ratios))
    rival = max((k for k in best if k.startswith("Trainer") and "grouped" not in k),
                key=lambda k: best[k]["tokens_per_s"])
    for name, side in sides.items():
        if "compiled" in name:
            rate = best[name]["tokens_per_s"]
            print(f"{name}: first step (compiles) {side.first:.1f} s, then {best[name]['step_s']:.2f} s a step; "
                  f"x{rate / best[ours_name]['tokens_per_s']:.2f} the uncompiled tokens/s, "
                  f"x{rate / best[rival]['tokens_per_s']:.2f} the Trainer's best")
    mine = best[ours_name]["tokens_per_s"]
    print(f"tokens/s {ours_name} / {rival} (the Trainer's best), median of the paired "
          f"steps: {statistics.median(paired[rival]):.2f}x (medians: {mine:.0f}"
          f" / {best[rival]['tokens_per_s']:.0f} = {mine / best[rival]['tokens_per_s']:.2f}x; target >= 1.5x)")


if __name__ == "__main__":
    main()
