"""PeriodicLoRA (arXiv 2402.16141): the unloader, torch + peft only.

Training is split into stages. Inside a stage only the LoRA factors A (r x k) and
B (d x r) train. At each unload point

    W <- W + c * s * B A            c = 1 - m, s = alpha / r, computed in fp32, cast once

then the adapter is re-set by the momentum rule, the LoRA parameters' optimizer state is
reset (or kept / pruned) and the LR schedule restarts (or continues). After T stages
W_T = W_0 + sum_t c s B_t A_t, whose rank can reach T r at LoRA's memory cost.

Momentum rules (the paper's wording, "scaling the BA product by (1 - m) and A and B
matrices by m", admits two readings):

* ``preserve`` (default): merge (1-m) s BA and keep m s BA in the adapter (B <- m B,
  A kept). The adapter's output leaves it and enters W, so the model's outputs just
  after an unload equal those just before it.
* ``paper``: merge (1-m) s BA and scale A and B by m each; the adapter keeps m^2 s BA,
  so the outputs change by -(m - m^2) s BA.

With m = 0 both are the plain unload: merge all, B <- 0, A re-initialised (peft's own
init: kaiming-uniform a=sqrt(5), or gaussian std 1/r), seeded by (seed, stage, layer) so
that every data-parallel rank draws the same A.

The rest of the algorithm lives beside this module: when to unload (:mod:`.clock`), the LR
schedule (:mod:`.schedule`), the merge itself (:mod:`.merge`) and how parameters and
optimizer state are read and written (:mod:`.access`; distributed engines such as DeepSpeed
ZeRO pass a :class:`~plora_ray.core.access.LocalAccess` subclass). PLoRA's bookkeeping is
not here: the caller may hand the unloader a ``ledger`` (every stage's merged factors, so W_T
can be rebuilt exactly from W_0) and a ``meter`` (the accumulated rank, measured off the
unload), both from :mod:`plora_ray.ledger`; the run layer builds them
(:func:`plora_ray.run.unloading.build_unloader`).
"""

from __future__ import annotations

import hashlib
import math
import time

import torch
from peft.tuners.lora import LoraLayer

from plora_ray.core.access import LocalAccess
from plora_ray.core.clock import UnloadClock, lap
from plora_ray.core.schedule import StageLR, refresh_lr

MOMENTUM_RULES = ("preserve", "paper")
OPTIMIZER_ON_UNLOAD = ("reset", "keep", "prune")
ADAPTER = "default"


def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    """peft LoRA layers by a short, stable name (``model.layers.0.self_attn.q_proj``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = module
    return out


def lora_parameters(model: torch.nn.Module, adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    params = []
    for layer in lora_layers(model, adapter).values():
        params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return params


def _seed_for(seed: int, stage: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_lora_a(shape, rank: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """peft's ``reset_lora_parameters`` init of A, drawn from ``generator`` (fp32)."""
    a = torch.empty(shape, dtype=torch.float32)
    if how == "kaiming":
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    elif how == "gaussian":
        torch.nn.init.normal_(a, std=1.0 / rank, generator=generator)
    else:
        raise ValueError(f"unknown init {how!r}")
    return a


class UnloadEvent:
    """One unload. ``ranks`` (per layer, the accumulated update's rank) is measured off the
    unload by a :class:`~plora_ray.ledger.rank.RankMeter`: reading ``ranks`` (or ``mean_rank``/``max_rank``) waits
    for it; :attr:`ranks_ready` says whether it is there."""

    def __init__(self, stage: int, step: int, samples: int, seconds: float, ranks: dict | None = None,
                 output_change: float | None = None, parts: dict | None = None, pending=None):
        self.stage = stage  # stages completed after this unload (1 for the first)
        self.step = step
        self.samples = samples
        self.seconds = seconds
        self._ranks = dict(ranks or {})
        self._pending = pending  # Future of the ranks
        self.output_change = output_change  # max |logits after - before| / max |before|, if measured
        self.parts = dict(parts or {})  # seconds: merge, ledger, reinit, optimizer, rank (submit)

    @property
    def ranks_ready(self) -> bool:
        return self._pending is None or self._pending.done()

    @property
    def ranks(self) -> dict[str, int]:
        if self._pending is not None:
            self._ranks = self._pending.result()
            self._pending = None
        return self._ranks

    @ranks.setter
    def ranks(self, value: dict[str, int]) -> None:
        self._ranks, self._pending = dict(value), None

    @property
    def mean_rank(self) -> float:
        ranks = self.ranks
        return sum(ranks.values()) / len(ranks) if ranks else 0.0

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def __repr__(self) -> str:
        return (f"UnloadEvent(stage={self.stage}, step={self.step}, samples={self.samples}, "
                f"seconds={self.seconds:.4f}, ranks_ready={self.ranks_ready})")


class PeriodicUnloader:
    """Merges the adapter into the backbone at unload points and resets what PLoRA resets.

    ``optimizer``/``scheduler`` may be None (pure algorithm tests). ``clock`` decides when
    (the caller advances it with ``clock.step(samples)``); :meth:`unload` does it now.

    Bookkeeping, built by the caller: ``ledger`` (an :class:`~plora_ray.ledger.store.UnloadLedger`,
    or None) receives every stage's merged factors through ``add_stage``; ``meter`` (a
    :class:`~plora_ray.ledger.rank.RankMeter` of that ledger, or None) measures the accumulated
    rank after each unload. ``keeps_ledger`` says that the run records its unloads (checkpoints
    store the ledger instead of the backbone) even where this process holds no ledger (one
    data-parallel rank suffices); by default, whether a ledger is given. ``base_digest`` is the
    digest of W_0 that such checkpoints record.
    """

    def __init__(self, model, optimizer=None, scheduler=None, *, clock: UnloadClock | None = None,
                 momentum: float = 0.0, momentum_rule: str = "preserve",
                 optimizer_on_unload: str = "reset", prune_ratio: float = 0.99,
                 init_a: str = "kaiming", seed: int = 0, adapter: str = ADAPTER,
                 access: LocalAccess | None = None, ledger=None, meter=None,
                 keeps_ledger: bool | None = None, base_digest: str | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum_rule not in MOMENTUM_RULES:
            raise ValueError(f"momentum_rule must be one of {MOMENTUM_RULES}")
        if optimizer_on_unload not in OPTIMIZER_ON_UNLOAD:
            raise ValueError(f"optimizer_on_unload must be one of {OPTIMIZER_ON_UNLOAD}")
        if meter is not None and ledger is None:
            raise ValueError("a rank meter needs the ledger it measures")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clock = clock or UnloadClock()
        self.momentum = momentum
        self.momentum_rule = momentum_rule
        self.optimizer_on_unload = optimizer_on_unload
        self.prune_ratio = prune_ratio
        self.init_a = init_a
        self.seed = seed
        self.adapter = adapter
        self.access = access or LocalAccess()
        self.layers = lora_layers(model, adapter)
        if not self.layers:
            raise ValueError("model has no peft LoRA layers to unload")
        self.ledger = ledger
        self.meter = meter
        self.keeps_ledger = ledger is not None if keeps_ledger is None else keeps_ledger
        self.base_digest = base_digest
        self.stage = 0

    def base_weights(self) -> dict[str, torch.nn.Parameter]:
        return {name: layer.get_base_layer().weight for name, layer in self.layers.items()}

    def _reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        if self.optimizer is None or self.optimizer_on_unload == "keep":
            return
        self.access.reset_optimizer_state(self.optimizer, params, self.optimizer_on_unload, self.prune_ratio)

    # -- the algorithm ------------------------------------------------------------

    @torch.no_grad()
    def unload(self) -> UnloadEvent:
        """Merge, re-initialise, reset. The stage's factors go to the ledger inline, after
        every layer is merged (an on-disk ledger writes one shard per stage, so the cost does
        not depend on the number of stages); the rank is only submitted to the meter, which
        measures it off the unload (a background thread, or on first request)."""
        t0 = time.perf_counter()
        parts = dict.fromkeys(("merge", "ledger", "reinit", "optimizer", "rank"), 0.0)
        m = self.momentum
        c = 1.0 - m
        ad = self.adapter
        stage = {}
        for index, (name, layer) in enumerate(self.layers.items()):
            lora_a, lora_b = layer.lora_A[ad].weight, layer.lora_B[ad].weight
            base = layer.get_base_layer().weight
            with self.access.gathered([base, lora_a, lora_b], modify=True):
                t = time.perf_counter()
                a = self.access.read(lora_a)
                b_full = self.access.read(lora_b)
                b = b_full * (c * layer.scaling[ad])
                # fp32 sum, cast once to the backbone dtype: the ledger's replay does the same
                self.access.merge(base, b, a, getattr(layer, "fan_in_fan_out", False))
                t = lap(parts, "merge", t)
                if self.ledger is not None:  # a may be lora_a itself, re-initialised below
                    stage[name] = (b, a.detach().clone())
                t = lap(parts, "ledger", t)
                if m == 0.0:
                    g = torch.Generator().manual_seed(_seed_for(self.seed, self.stage, index))
                    new_a = init_lora_a(a.shape, layer.r[ad], self.init_a, g)
                    new_b = torch.zeros_like(b_full)
                elif self.momentum_rule == "preserve":
                    new_a, new_b = a, b_full * m
                else:  # paper
                    new_a, new_b = a * m, b_full * m
                self.access.write(lora_a, new_a)
                self.access.write(lora_b, new_b)
                lap(parts, "reinit", t)
        t = time.perf_counter()
        if self.ledger is not None:
            self.ledger.add_stage(stage)
        t = lap(parts, "ledger", t)
        self._reset_optimizer_state(lora_parameters(self.model, ad))
        if self.scheduler is not None:
            for fn in self.scheduler.lr_lambdas:
                if isinstance(fn, StageLR):
                    fn.mark_unload(self.scheduler.last_epoch)
            refresh_lr(self.scheduler)
        t = lap(parts, "optimizer", t)
        self.stage += 1
        pending = self.meter.submit(self.ledger.num_stages) if self.meter is not None else None
        lap(parts, "rank", t)
        return UnloadEvent(stage=self.stage, step=self.clock.steps, samples=self.clock.samples,
                           seconds=time.perf_counter() - t0, parts=parts, pending=pending)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "clock": self.clock.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.clock.load_state_dict(state["clock"])

