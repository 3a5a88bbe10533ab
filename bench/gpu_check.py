"""The GPU check: bf16 PLoRA under DeepSpeed ZeRO-2 and ZeRO-3 against the one-process run, on a
~1B-parameter Llama built from a config (random weights), with gradient checkpointing on.

    bash bench/gpu_check.sh                          # the one command (prints "skipped: no GPU" without one)
    python bench/gpu_check.py [--steps 12] [--out DIR] [--keep]
    python bench/gpu_check.py --smoke                # the same checks on the CPU: tiny Llama, 2 gloo workers

What runs (each in its own process group, every CUDA device a worker: one GPU = world 1):
the one-process reference (torch, workers 1, the same global batches) and the same run under
DeepSpeed ZeRO-2 and ZeRO-3 (built partitioned, ``deepspeed.zero.Init``), all from one model
folder (TinyLlama-1.1B's architecture, seeded random weights, saved once), on synthetic
dialogues of ~``max_length`` tokens, unloading every ``--unload-every`` steps. Checked per run:

* gradient checkpointing is on in the built model (``model.gradient_checkpointing``);
* every unload is function-preserving (the probe's output change, ``plora.measure_output_change``);
* the unload is exact: W_0 + the run's ledger, replayed on the training device, equals the
  trained backbone bit for bit (every LoRA-wrapped layer; gathered under ZeRO-3);
* ZeRO-2/3 against the reference: the loss of every step, and the learned update
  dW = sum_t B_t A_t + s B A of every layer (ledger + final factors, float64), relative;
* memory: the estimate of ``plora_ray.run.memory`` (from the config, no weights) against the
  measured peak (GPU: ``max_memory_allocated`` / ``max_memory_reserved``; CPU: RSS growth, which
  the libraries dominate at the smoke size: printed, not judged);
* MFU: model FLOPs (``bench/mfu.py``'s count: recomputation not counted) per second of the steps
  without an unload after the warm-up, over a bf16 matmul peak measured in the same run, per worker.

Exit 0 and a last line ``gpu check: PASS`` when every check holds; 1 and the failures otherwise.
``--out`` keeps ``results.json`` (every figure) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

# TinyLlama-1.1B's architecture (its config.json): 1.10e9 parameters
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMOKE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ENGINES = {"reference": {"engine": "ddp"}, "zero2": {"engine": "deepspeed", "zero_stage": 2},
           "zero3": {"engine": "deepspeed", "zero_stage": 3}}
# bf16: the reference keeps LoRA factors in fp32, DeepSpeed computes them in bf16 (fp32 master
# copy): runs agree to bf16 rounding, amplified by Adam's first steps after each reset
TOL = {"output_change": 2e-2, "loss": 2e-2, "update": 0.1}


def write_model(directory: Path, shape: dict, seed: int) -> int:
    """A Llama of ``shape`` with seeded random weights and the tiny byte-level tokenizer, saved
    as a model folder (bf16); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from plora_ray.run.models import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert shape["vocab_size"] >= len(tok)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers measure their own peaks; leave them the memory
    return n


def write_rows(path: Path, n: int, chars: int, seed: int) -> None:
    """``n`` two-turn dialogues of ~``chars`` bytes (one byte-level token each), half of them the
    assistant's reply (the labelled part)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta unload ledger rank merge step loss the of and to a in is that for it".split()

    def text(k):
        out = " ".join(rng.choice(words) for _ in range(k // 4 + 1))  # words average ~4.5 bytes
        return out[:k].rstrip()

    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(chars // 2)},
                                             {"role": "assistant", "content": text(chars // 2)}]}) + "\n")


def run_config(args, model_dir: Path, rows: Path, cache: Path, engine: str, world: int):
    from plora_ray.config.io import build_run_config

    one = engine == "reference"
    return build_run_config({
        "name": f"gpu-check-{engine}", "seed": 0, "method": "plora",
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", "gradient_checkpointing": True},
        "plora": {"unload_every_steps": args.unload_every, "momentum": 0.1, "measure_output_change": True},
        "optim": {"lr": args.lr},
        "data": {"train_files": [str(rows)], "max_length": args.max_length, "micro_batch_size": args.micro_batch,
                 "gradient_accumulation_steps": world if one else 1, "max_steps": args.steps,
                 "cache_dir": str(cache)},
        "distributed": {"workers": 1 if one else world, "use_gpu": args.gpu, **ENGINES[engine]}})


def matmul_peak(device, dtype, n: int, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` n x n matmuls on ``device`` (after one warm-up)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def rss_bytes(peak: bool = False) -> int:
    """This process's resident set now (or its peak: VmHWM, which ``reset_rss_peak`` restarts)."""
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def checkpointing_on(model) -> bool:
    from transformers import PreTrainedModel

    return any(getattr(m, "is_gradient_checkpointing", False) for m in model.modules()
               if isinstance(m, PreTrainedModel))


def replay_exact(run, model_dir: Path) -> dict:
    """Collective: W_0 (read from the model folder) + the ledger, replayed on the training device,
    against every trained LoRA-wrapped weight (gathered under ZeRO-3); rank 0 answers."""
    import torch
    from safetensors import safe_open

    acc, ledger = run.engine.access, run.unloader.ledger
    files = sorted(model_dir.glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            where.update({k: f for k in st.keys()})
    differ, worst, layers = [], 0.0, 0
    for name, layer in run.unloader.layers.items():
        w = layer.get_base_layer().weight
        with acc.gathered([w]):
            if run.rank != 0:
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            with safe_open(str(where[key]), "pt", device="cpu") as st:
                w0 = st.get_tensor(key).to(w.device)
            replayed = ledger.replay(name, w0, getattr(layer, "fan_in_fan_out", False))
            layers += 1
            if not torch.equal(replayed, w.data.view_as(replayed)):
                differ.append(name)
                worst = max(worst, float((replayed.float() - w.data.float()).abs().max()))
    return {"layers": layers, "differ": differ[:5], "n_differ": len(differ), "max_abs": worst}


def timed_steps(run, warmup: int) -> tuple[float, float, int]:
    """(model FLOPs, seconds, steps) of the steps after ``warmup`` with no unload (whose time
    would count the unload): ``bench/mfu.py``'s FLOP count of each global step."""
    from mfu import step_flops

    unloaded = {e.step for e in run.unloads}
    flops = seconds = 0.0
    n = 0
    config = run.model.config
    for rec, micro_batches in zip(run.history, run.steps):
        if rec["step"] <= warmup or rec["step"] in unloaded:
            continue
        tokens = sum(len(run.examples[i]["input_ids"]) for mb in micro_batches for i in mb)
        useful, _ = step_flops(config, run.examples, micro_batches, "lora", run.cfg.lora.rank)
        flops, seconds, n = flops + useful, seconds + tokens / rec["tokens_per_s"], n + 1
    return flops, seconds, n


def worker(rank: int, world: int, port: int, jobs: list, model_dir: str, warmup: int) -> None:
    """One rank: every run of ``jobs`` ((engine, config JSON, output folder)) in turn; the
    one-process reference on rank 0 alone while the others wait."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import warnings

    import torch
    import torch.distributed as dist

    from plora_ray.config.schema import RunConfig

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's and transformers' renames
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gpu = RunConfig.model_validate_json(jobs[0][1]).distributed.use_gpu
    if gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    # a CPU's bf16 peak, the best of several sizes: without bf16 hardware (AVX2) a 1024² matmul
    # ran at 1.0 GFLOP/s and a 128² one at 3.9, and the model's small matmuls beat the former
    peak = matmul_peak(device, torch.bfloat16, 8192) if gpu else max(
        matmul_peak(device, torch.bfloat16, n) for n in (128, 256, 512, 1024))
    for engine, cfg_json, out in jobs:
        one = RunConfig.model_validate_json(cfg_json).distributed.workers == 1
        if not one or rank == 0:
            result = one_run(RunConfig.model_validate_json(cfg_json), rank if not one else 0, 1 if one else world,
                             device, Path(model_dir), Path(out), warmup)
            if rank == 0:
                result.update(engine=engine, peak_flops=peak)
                (Path(out) / "result.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


def one_run(cfg, rank: int, world: int, device, model_dir: Path, out: Path, warmup: int) -> dict:
    """Train, measure, save the checkpoint into ``out``, check the ledger's replay. Memory
    is counted from what this process held before (a run before it may leave caches)."""
    import gc

    import torch

    from plora_ray.run.checkpoint import save_checkpoint
    from plora_ray.run.loop import fit, setup

    gpu = device.type == "cuda"
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if gpu else 0
    if not gpu:
        reset_rss_peak()
    rss0, t0 = rss_bytes(), time.perf_counter()
    run = setup(cfg, rank, world, device)
    setup_s = time.perf_counter() - t0
    fit(run, progress=False)
    memory = {"allocated": torch.cuda.max_memory_allocated(device) - base,
              "reserved": torch.cuda.max_memory_reserved(device) - base,
              "device_total": torch.cuda.get_device_properties(device).total_memory} if gpu else \
        {"rss_growth": rss_bytes(peak=True) - rss0}
    flops, seconds, n = timed_steps(run, warmup)
    ckpt = save_checkpoint(run, out / "checkpoint")
    exact = replay_exact(run, model_dir)
    result = {"world": world, "history": run.history, "checkpoint": str(ckpt),
              "unloads": [{"step": e.step, "output_change": e.output_change} for e in run.unloads],
              "checkpointing": checkpointing_on(run.model), "replay": exact, "memory": memory,
              "setup_s": setup_s, "flops": flops, "seconds": seconds, "timed_steps": n,
              "device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__}
    del run
    return result


def launch(world: int, cfgs: dict, model_dir: Path, root: Path, warmup: int) -> dict:
    """Every run of ``cfgs`` (engine -> RunConfig) in ``world`` spawned processes; their results."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = [(e, cfg.model_dump_json(), str(root / e)) for e, cfg in cfgs.items()]
    mp.start_processes(worker, args=(world, port, jobs, str(model_dir), warmup), nprocs=world,
                       start_method="spawn")
    return {e: json.loads((root / e / "result.json").read_text()) for e in cfgs}


def updates(checkpoint: str, scale: float):
    """(layer, its learned update sum_t B_t A_t + s B A in float64) from a checkpoint, one layer
    at a time (a 1.1B model's updates would take 8 GB at once)."""
    import torch
    from safetensors.torch import load_file

    from plora_ray.ledger.store import UnloadLedger

    ledger = UnloadLedger.load(Path(checkpoint) / "ledger")
    factors = load_file(str(Path(checkpoint) / "trainable.safetensors"))
    for layer in ledger.layers:
        bs, as_ = zip(*ledger.stage_factors(layer))
        prefix = layer if f"{layer}.lora_A.default.weight" in factors else f"base_model.model.{layer}"
        b, a = factors[f"{prefix}.lora_B.default.weight"], factors[f"{prefix}.lora_A.default.weight"]
        stacked_b = torch.cat([t.double() for t in bs] + [scale * b.double()], dim=1)
        stacked_a = torch.cat([t.double() for t in as_] + [a.double()], dim=0)
        yield layer, stacked_b @ stacked_a


def compare(result: dict, ref: dict, scale: float) -> dict:
    """Loss of every step and the learned updates against the reference (relative: the largest
    over steps; over all layers together, and the worst layer)."""
    losses = [(a["loss"], b["loss"]) for a, b in zip(result["history"], ref["history"])]
    num = den = 0.0
    worst = ("", 0.0)
    for (layer, mine), (other, theirs) in zip(updates(result["checkpoint"], scale), updates(ref["checkpoint"], scale)):
        assert layer == other, (layer, other)
        d, n = float((mine - theirs).norm() ** 2), float(theirs.norm() ** 2)
        num, den = num + d, den + n
        worst = max(worst, (layer, (d / n) ** 0.5), key=lambda x: x[1])
    return {"loss": max(abs(a - b) / abs(b) for a, b in losses), "update": (num / den) ** 0.5,
            "worst_layer": list(worst)}


def judge(name: str, r: dict, est, gpu: bool, cmp: dict | None) -> list[str]:
    bad = []
    if not r["checkpointing"]:
        bad.append(f"{name}: gradient checkpointing is off in the built model")
    if not r["unloads"]:
        bad.append(f"{name}: no unload happened")
    changes = [u["output_change"] for u in r["unloads"]]
    if changes and max(changes) > TOL["output_change"]:
        bad.append(f"{name}: an unload changed the outputs by {max(changes):.1e} > {TOL['output_change']:g}")
    rp = r["replay"]
    if rp["n_differ"] or not rp["layers"]:
        bad.append(f"{name}: W_0 + ledger differs from the trained backbone in {rp['n_differ']} of "
                   f"{rp['layers']} layers (max |diff| {rp['max_abs']:.1e}, e.g. {rp['differ'][:2]})")
    if cmp and cmp["loss"] > TOL["loss"]:
        bad.append(f"{name}: loss {cmp['loss']:.1e} from the one-process run (> {TOL['loss']:g})")
    if cmp and cmp["update"] > TOL["update"]:
        bad.append(f"{name}: learned update {cmp['update']:.1e} from the one-process run (> {TOL['update']:g})")
    if gpu and r["memory"]["reserved"] > est.total:
        bad.append(f"{name}: measured peak {r['memory']['reserved'] / 2**30:.2f} GiB reserved > estimate "
                   f"{est.total / 2**30:.2f} GiB: the memory-fit check would let this run OOM")
    return bad


def memory_cell(r: dict, est, gpu: bool) -> str:
    g, m = 2**30, r["memory"]
    if gpu:
        return (f"{est.total / g:.2f} / {m['allocated'] / g:.2f} alloc, {m['reserved'] / g:.2f} reserved "
                f"(alloc / est. w/o runtime {m['allocated'] / max(est.total - est.runtime, 1):.2f})")
    return f"{est.total / g:.3f} / {m['rss_growth'] / g:.3f} RSS growth"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, 2 gloo workers: the checks, in seconds")
    p.add_argument("--steps", type=int)
    p.add_argument("--unload-every", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--engines", default="zero2,zero3")
    p.add_argument("--out", help="keep the model, data, checkpoints and results.json here")
    args = p.parse_args(argv)
    defaults = dict(steps=4, unload_every=2, micro_batch=2, max_length=64, warmup=1) if args.smoke else \
        dict(steps=12, unload_every=4, micro_batch=8, max_length=2048, warmup=2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    args.gpu = torch.cuda.is_available() and not args.smoke
    if not args.gpu and not args.smoke:
        print("skipped: no GPU (torch.cuda.is_available() is False; --smoke runs the checks on the CPU)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["DS_ACCELERATOR"] = "cuda" if args.gpu else "cpu"  # an inherited "cpu" would hide the GPUs
    world = torch.cuda.device_count() if args.gpu else 2
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        shape = SMOKE if args.smoke else FULL
        n_params = write_model(root / "model", shape, seed=0)
        rows = root / "rows.jsonl"
        # ChatML's markers take ~30 of max_length's tokens
        write_rows(rows, args.steps * args.micro_batch * world + 8, max(args.max_length - 40, 16), seed=0)
        engines = ["reference"] + [e for e in args.engines.split(",") if e]
        cfgs = {e: run_config(args, root / "model", rows, root / "cache", e, world) for e in engines}
        results = launch(world, cfgs, root / "model", root, args.warmup)
        return report(args, world, n_params, shape, cfgs, results, root, time.perf_counter() - t0)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


def report(args, world, n_params, shape, cfgs, results, root: Path, elapsed: float) -> int:
    from plora_ray.run.memory import estimate

    ref = results["reference"]
    cfg = cfgs["reference"]
    scale = cfg.lora.alpha / cfg.lora.rank
    print(f"gpu check: {ref['device']}, {world} worker(s), torch {ref['torch']}; Llama of {n_params:,} "
          f"parameters ({'tiny' if args.smoke else 'TinyLlama-1.1B'} shape, random weights), bf16, LoRA r "
          f"{cfg.lora.rank} on {len(cfg.lora.target_modules)} modules, gradient checkpointing, micro-batch "
          f"{args.micro_batch} x {args.max_length} tokens, {args.steps} steps, unload every {args.unload_every}")
    head = f"{'run':10} {'world':>5} {'ckpt':>4} {'unloads':>7} {'out. change':>11} {'replay exact':>12} " \
           f"{'loss diff':>9} {'update diff':>11} {'MFU':>6}  memory GiB: estimate / measured"
    print(head)
    failures, record = [], {}
    for name, r in results.items():
        est = estimate(cfgs[name], workers=r["world"])
        cmp = None if name == "reference" else compare(r, ref, scale)
        failures += judge(name, r, est, args.gpu, cmp)
        mfu = r["flops"] / r["seconds"] / r["world"] / r["peak_flops"] if r["seconds"] else float("nan")
        changes = [u["output_change"] for u in r["unloads"]]
        rp = r["replay"]
        print(f"{name:10} {r['world']:5d} {'on' if r['checkpointing'] else 'OFF':>4} {len(r['unloads']):7d} "
              f"{max(changes, default=float('nan')):11.1e} {rp['layers'] - rp['n_differ']:>5d}/{rp['layers']:<6d} "
              f"{cmp['loss'] if cmp else float('nan'):9.1e} {cmp['update'] if cmp else float('nan'):11.1e} "
              f"{mfu:6.1%}  {memory_cell(r, est, args.gpu)}")
        record[name] = {**{k: v for k, v in r.items() if k != "history"}, "compare": cmp, "mfu": mfu,
                        "estimate": {"total": est.total, "runtime": est.runtime, "summary": est.summary()},
                        "losses": [h["loss"] for h in r["history"]]}
    print(f"MFU: model FLOPs (no recomputation) of {results['reference']['timed_steps']} steps without an unload "
          f"after {args.warmup} warm-up, per worker, over a bf16 matmul peak measured in the run "
          f"({ref['peak_flops'] / 1e12:.1f} TFLOP/s); tolerances: {TOL}")
    for name, r in record.items():
        print(f"estimate {name}: {r['estimate']['summary']}")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "params": n_params, "shape": shape,
                                                   "seconds": elapsed, "runs": record}, indent=1))
    for line in failures:
        print("FAIL:", line)
    print(f"gpu check: {'FAIL' if failures else 'PASS'} ({elapsed:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
