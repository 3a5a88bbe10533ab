"""A checkpoint's evaluation in the main sweep, with and without the head-side savings, timed in
interleaved rounds in one run.

    python bench/eval_cost.py [SWEEP.yaml] [--rounds 3] [--threads 1]

The model, tokenizer, held-out problems and benchmark items of the sweep's base (default: the
main command's ``search_spaces/unload.yaml``: SmolLM2-135M-Instruct, held-out 32 problems, ARC-Easy
30, MMLU 20, GSM8K 4 generations of up to 128 tokens), one thread as a trial's worker has. The
savings, all switched off in the reference form:

* ``kv_prefix.dense_head``: the output head gets row-major input (``logits_to_keep=1`` slices
  otherwise run the vocabulary projection as a batched matmul on copies of its weight);
* ARC's continuations: the head and the log-softmax only on the scored positions (``head_on``);
* the held-out cross-entropy over 4 MiB chunks of rows instead of one fp32 copy of all logits.

Each round times every task in both forms (order alternating). Printed: seconds per task and
form (median over rounds), whether every metric and per-item record is equal in both forms, and,
last, the reference's total over the new total.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from heldout_cost import cpu_model, sweep_model  # noqa: E402


@contextlib.contextmanager
def reference_form():
    """The evaluation without the savings (module docstring)."""
    from plora_ray.evaluation import heldout, multiple_choice, run

    saved = run.dense_head, multiple_choice.head_on, heldout.ROW_CHUNK_BYTES
    run.dense_head = multiple_choice.head_on = lambda model, *a: contextlib.nullcontext()
    heldout.ROW_CHUNK_BYTES = 2**62
    try:
        yield
    finally:
        run.dense_head, multiple_choice.head_on, heldout.ROW_CHUNK_BYTES = saved


def main() -> None:
    import torch

    from plora_ray.evaluation import run

    args, cfg, model, tok, examples = sweep_model(__doc__, rounds=3)
    ev = cfg.eval
    limit = {"*": ev.limit, **ev.task_limits} if ev.task_limits else ev.limit
    jobs = (["heldout"] if examples else []) + list(ev.tasks)

    def one(job: str):
        tasks, held = ([], examples) if job == "heldout" else ([job], None)
        t = time.perf_counter()
        res = run.evaluate(model, tok, tasks, limit, ev.prompt_style, ev.batch_size, ev.num_fewshot,
                           max_new_tokens=ev.max_new_tokens, heldout=held, gsm8k_items=ev.gsm8k_items,
                           datasets=ev.datasets)
        return time.perf_counter() - t, (dict(res), res.samples)

    one(jobs[0])  # warm-up
    times = {(j, f): [] for j in jobs for f in ("reference", "new")}
    out = {}
    for r in range(args.rounds):
        for form in (("reference", "new") if r % 2 == 0 else ("new", "reference")):
            for job in jobs:
                with reference_form() if form == "reference" else contextlib.nullcontext():
                    dt, out[job, form] = one(job)
                times[job, form].append(dt)

    def same(a, b) -> bool:  # NaN standard errors of one-item groups compare equal here
        return a == b or (a != a and b != b)

    equal = all(all(same(out[j, "reference"][0][k], v) for k, v in out[j, "new"][0].items())
                and out[j, "reference"][1] == out[j, "new"][1] for j in jobs)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s); {cfg.model.name_or_path} "
          f"{next(model.parameters()).dtype}; {args.rounds} rounds")
    print("| task | reference s (median) | new s (median) | reference ÷ new |")
    print("|---|---|---|---|")
    tot = {"reference": 0.0, "new": 0.0}
    for job in jobs:
        med = {f: statistics.median(times[job, f]) for f in tot}
        for f in tot:
            tot[f] += med[f]
        print(f"| {job} | {med['reference']:.2f} | {med['new']:.2f} | {med['reference'] / med['new']:.3f} |")
    print(f"| all | {tot['reference']:.2f} | {tot['new']:.2f} | {tot['reference'] / tot['new']:.3f} |")
    print(f"every metric and per-item record equal in both forms: {equal}")
    print(f"checkpoint evaluation, reference / new: {tot['reference'] / tot['new']:.3f}")


if __name__ == "__main__":
    main()
