"""Execution engines: how one optimizer step's gradients are computed, reduced and applied.

* :class:`TorchEngine` — one process, or torch DDP across data-parallel workers.
* :class:`DeepSpeedEngine` — DeepSpeed ZeRO 0-3 (fp32 or bf16, optional CPU offload); its config
  is :func:`plora_ray.run.dsconfig.deepspeed_config` (the run config merged with the user's JSON).

Both expose the same small surface to the training loop (``model``, ``module``,
``optimizer``, ``accumulating``, ``backward``, ``step``, ``all_reduce_sum``) and an
``access`` object through which the unloader and checkpoints read and write parameters and
optimizer state. The PLoRA algorithm itself is engine-agnostic.

Gradient scaling: each worker back-propagates ``loss_sum_local * world / tokens_global``;
DDP and DeepSpeed average gradients over workers, so the applied gradient is that of the
mean loss over every labelled token of the global step, as in one process.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from plora_ray.config.schema import RunConfig
from plora_ray.core.access import LocalAccess, prune_by_magnitude
from plora_ray.kernels.merge_bf16 import merge_bf16_
from plora_ray.run.dsconfig import deepspeed_config, prepare_deepspeed
from plora_ray.run.models import DTYPES


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TorchAccess(LocalAccess):
    """Direct access plus the optimizer state as full tensors (for checkpoints)."""

    def __init__(self, optimizer):
        super().__init__(fused=merge_bf16_)  # the fused bf16 CPU merge, as the ledger's replay
        self.optimizer = optimizer

    def read_optimizer_state(self, param) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(param, {})
        return {k: (v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v)))
                for k, v in state.items()}

    def write_optimizer_state(self, param, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.optimizer.state.pop(param, None)
            return
        self.optimizer.state[param] = {
            k: (v.to(param.device).float() if k != "step" else v.float().clone()) for k, v in state.items()
        }


class _Engine:
    device: torch.device
    world: int

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world == 1 or not dist_ready():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class TorchEngine(_Engine):
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, rank=0, world=1):
        self.module = model.to(device)
        self.device, self.rank, self.world = device, rank, world
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(trainable(model), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.max_grad_norm = o.max_grad_norm
        self.model = self.module
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.access = TorchAccess(self.optimizer)

    def accumulating(self, last: bool):
        """Skip the gradient all-reduce on all but the step's last micro-batch."""
        if self.world > 1 and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable(self.module), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------- DeepSpeed


class DeepSpeedAccess(TorchAccess):
    """Reads and writes through DeepSpeed's fp32 master copy and partitioned state.

    Pitfalls handled (measured on DeepSpeed 0.19.8):
    * ZeRO-1/2/3 write the optimizer's fp32 master copy back into the model at the next
      step, so an in-place re-init of A/B would be silently undone: new values also go to
      the master copy (``safe_set_full_fp32_param``) and the moments are zeroed with
      ``safe_set_full_optimizer_state``, on every rank with full tensors.
    * ZeRO-3 partitions the weights: reads and writes happen inside ``GatheredParameters``
      (``modifier_rank=0`` when writing: rank 0's values are broadcast on exit).
    * The merge reads A and B from the fp32 master copy, not the bf16 model copy.
    * AdamW's step counter lives per flat parameter group: it is reset (all trainable
      parameters are LoRA factors in PLoRA, so all of them restart together).
    """

    def __init__(self, engine, base_optimizer, stage: int):
        super().__init__(base_optimizer)
        self.engine, self.stage = engine, stage
        import deepspeed.utils as dsu

        self.dsu = dsu

    def gathered(self, params, modify: bool = False):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)

    def read(self, param):
        if param.requires_grad and self.stage > 0:
            full = self.dsu.safe_get_full_fp32_param(param)
            if full is not None:
                return full.detach().float()
        return param.detach().float()

    def write(self, param, value):
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))
        if param.requires_grad and self.stage > 0:
            self.dsu.safe_set_full_fp32_param(param, value.float().to(param.device))

    def _set_step(self, value: float) -> None:
        for group in self.optimizer.param_groups:  # FusedAdam counts steps per group
            if "step" in group:
                group["step"] = int(value)
        for state in self.optimizer.state.values():
            if "step" in state:
                if torch.is_tensor(state["step"]):
                    state["step"].fill_(value)
                else:
                    state["step"] = value

    def _get_step(self) -> float:
        for state in self.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def reset_optimizer_state(self, optimizer, params, policy: str, prune_ratio: float) -> None:
        if self.stage == 0:
            return super().reset_optimizer_state(optimizer, params, policy, prune_ratio)
        ids = {id(p) for p in params}
        only_lora = all(id(p) in ids for p in trainable(self.engine.module))
        if policy == "reset" and only_lora:
            # every flat fp32 partition holds LoRA factors only: reset it whole, step included
            self._set_step(0)
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.zero_()
                    else:
                        state[key] = 0
            return
        if policy == "reset":
            raise NotImplementedError("resetting part of a ZeRO optimizer's flat state (trainable "
                                      "parameters besides the LoRA factors) is not supported")
        for p in params:
            for key in ("exp_avg", "exp_avg_sq"):
                full = self.dsu.safe_get_full_optimizer_state(p, key)
                if full is not None:
                    prune_by_magnitude(full, prune_ratio)
                    self.dsu.safe_set_full_optimizer_state(p, full, key)

    def read_optimizer_state(self, param):
        if self.stage == 0:
            return super().read_optimizer_state(param)
        if not self.optimizer.state:  # before the first step
            return {}
        out = {k: self.dsu.safe_get_full_optimizer_state(param, k).detach().float().cpu()
               for k in ("exp_avg", "exp_avg_sq")}
        out["step"] = torch.tensor(self._get_step())
        return out

    def ensure_optimizer_state(self) -> None:
        """AdamW creates its state at the first step and ZeRO links it to the parameters
        then; a checkpoint restored before any step needs both now."""
        if self.stage == 0 or self.optimizer.state:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
        ds_opt = self.engine.optimizer
        if hasattr(ds_opt, "_lazy_init_hp_params_optimizer_state"):
            ds_opt._lazy_init_hp_params_optimizer_state()

    def write_optimizer_state(self, param, state):
        if self.stage == 0:
            return super().write_optimizer_state(param, state)
        if not state:
            return
        self.ensure_optimizer_state()
        for k in ("exp_avg", "exp_avg_sq"):
            self.dsu.safe_set_full_optimizer_state(param, state[k].to(param.device).float(), k)
        self._set_step(float(state["step"]))


def hidden_size(model: torch.nn.Module) -> int | None:
    """The width of ``model`` (a transformers model, maybe inside peft), for "auto" bucket sizes."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None)


def built_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built inside ``deepspeed.zero.Init`` (its weights are ZeRO-3
    partitions already; ``run.models.build_model`` under ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class DeepSpeedEngine(_Engine):
    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device, rank=0, world=1):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        prepare_deepspeed()
        import deepspeed

        self.device, self.rank, self.world = device, rank, world
        self.stage = cfg.distributed.zero_stage
        if built_partitioned(model):  # zero.Init placed the partitions; what peft added is not one yet
            dtype = DTYPES[cfg.model.dtype]
            for p in model.parameters():
                if not hasattr(p, "ds_id"):  # as DeepSpeed casts every parameter of a model it did not build
                    p.data = p.data.to(device=device, dtype=dtype)
        else:
            model = model.to(device)
        self.config = deepspeed_config(cfg, world, hidden_size(model))
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable(model), config=self.config)
        self.model = engine
        self.module = engine.module
        # the torch optimizer the LR schedule drives (ZeRO wraps it)
        self.optimizer = getattr(ds_opt, "optimizer", ds_opt) if self.stage > 0 else ds_opt
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise RuntimeError(f"unexpected DeepSpeed optimizer {type(self.optimizer).__name__}")
        self.access = DeepSpeedAccess(engine, self.optimizer, self.stage)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # unmanaged accumulation: step() reduces

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.model.step()


def make_engine(model, cfg: RunConfig, device, rank=0, world=1):
    if cfg.distributed.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, device, rank, world)
    return TorchEngine(model, cfg, device, rank, world)
