"""What every spawned two-process test shares: real torch.distributed (gloo) processes on this
machine, no Ray. ``free_port`` for the rendezvous; ``init_gloo`` in each child."""

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """The environment torch.distributed and DeepSpeed read, one thread, then the gloo process
    group (DeepSpeed's JIT ops go where the engine puts them: ``config.paths.extensions_dir``)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
