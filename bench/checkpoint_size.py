"""Checkpoint size at LLaMA-7B shapes: the unload ledger against full copies of the layers.

    python bench/checkpoint_size.py [--rank 8] [--stages 1,2,5,10,20,30,40,50]

32 decoder layers, LoRA on all 7 projections (q, k, v, o: 4096 x 4096; gate, up: 11008 x
4096; down: 4096 x 11008). Sizes come from shapes and dtypes only (meta tensors, nothing
is allocated): the ledger holds T fp32 factor pairs per layer (r (d + k) numbers each), a
full-copy checkpoint every unloaded d x k weight in bf16. Both also hold the LoRA factors
and their Adam moments (fp32, 3 copies), the same for both and printed apart.

The ledger is kept on disk (one shard per stage) and a checkpoint hard-links the shards, so
what a checkpoint writes is the adapter, its optimizer state and the links; the ledger's
size here is what Ray persists (copies) when it uploads the checkpoint directory.
"""

import argparse

import torch

LAYERS = 32
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def ledger_bytes(rank: int, stages: int) -> int:
    """ledger/ payload: one (B: d x r, A: r x k) fp32 pair per layer and stage."""
    per_stage = sum(nbytes(torch.empty(d, rank, device="meta")) + nbytes(torch.empty(rank, k, device="meta"))
                    for d, k in SHAPES.values())
    return LAYERS * per_stage * stages


def copies_bytes(dtype=torch.bfloat16) -> int:
    """backbone.safetensors payload: every unloaded weight, once, whatever T."""
    return LAYERS * sum(nbytes(torch.empty(d, k, device="meta", dtype=dtype)) for d, k in SHAPES.values())


def adapter_bytes(rank: int) -> int:
    """LoRA A and B in fp32 plus Adam's exp_avg and exp_avg_sq: in both kinds of checkpoint."""
    return 3 * ledger_bytes(rank, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--stages", default="1,2,5,10,20,30,40,50")
    args = p.parse_args()
    stages = [int(t) for t in args.stages.split(",")]
    gb = 1e9
    copies = copies_bytes()
    print(f"LLaMA-7B shapes, {LAYERS} layers x 7 projections, r {args.rank}; adapter + Adam state "
          f"{adapter_bytes(args.rank) / gb:.2f} GB in either checkpoint")
    print(f"{'T':>4}  {'ledger (fp32)':>14}  {'full copies (bf16)':>18}  ledger / copies")
    for t in stages:
        led = ledger_bytes(args.rank, t)
        print(f"{t:>4}  {led / gb:>11.2f} GB  {copies / gb:>15.2f} GB  {led / copies:>10.3f}")
    even = copies / ledger_bytes(args.rank, 1)
    print(f"ledger host memory: one stage during an unload = {ledger_bytes(args.rank, 1) / copies:.4f} of the "
          f"unloaded layers' bf16 bytes, 0 between unloads (the shards are on disk)")
    print(f"ledger / copies at T={stages[-1]}: {ledger_bytes(args.rank, stages[-1]) / copies:.3f} "
          f"(break-even at T = {even:.0f})")


if __name__ == "__main__":
    main()
