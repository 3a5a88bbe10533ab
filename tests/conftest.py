import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes share the two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """A RunConfig for the tiny model; tests tweak it with model_copy/update."""
    from plora_ray.config.io import build_run_config

    def make(**sections):
        data = {"name": "test", "method": "plora", "plora": {"unload_every_steps": 2},
                "data": {"max_length": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 2}}
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        return build_run_config(data)

    return make
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
