"""PeriodicLoRA (arXiv 2402.16141): the whole algorithm, torch + peft only.

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

The ledger keeps every stage's merged factors (c s B_t, A_t) in fp32 on the CPU, so
W_T can be rebuilt exactly from W_0 and the rank of the accumulated update is measured
from small matrices (QR of the stacked factors), never a d x k SVD.

Distributed engines (DeepSpeed ZeRO) hold their own copies of parameters and optimizer
state: they pass a :class:`LocalAccess` subclass that reads, writes and resets through them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

MOMENTUM_RULES = ("preserve", "paper")
OPTIMIZER_ON_UNLOAD = ("reset", "keep", "prune")
ADAPTER = "default"


# ----------------------------------------------------------------------------- clock


class UnloadClock:
    """Decides when to unload, from samples actually consumed or optimizer steps.

    Call :meth:`step` once per optimizer step with the number of samples that step
    consumed (all micro-batches of the accumulation, all data-parallel workers). With
    ``every_samples = N`` an unload fires at the first step boundary at which the total
    number of samples reaches a multiple of N (exactly at k*N when steps align with it;
    several multiples crossed in one step give one unload). With ``every_steps = K``
    every K-th step unloads. With neither it never fires (plain LoRA).
    """

    def __init__(self, every_samples: int | None = None, every_steps: int | None = None):
        if every_samples is not None and every_steps is not None:
            raise ValueError("give every_samples or every_steps, not both")
        self.every_samples = every_samples
        self.every_steps = every_steps
        self.steps = 0
        self.samples = 0
        self.samples_since_unload = 0
        self.steps_since_unload = 0
        self.unloads = 0

    def step(self, samples: int) -> bool:
        if samples < 0:
            raise ValueError("samples must be >= 0")
        self.steps += 1
        self.samples += samples
        self.samples_since_unload += samples
        self.steps_since_unload += 1
        due = False
        if self.every_samples is not None and self.samples_since_unload >= self.every_samples:
            self.samples_since_unload %= self.every_samples
            due = True
        if self.every_steps is not None and self.steps_since_unload >= self.every_steps:
            due = True
        if due:
            self.steps_since_unload = 0
            self.unloads += 1
        return due

    def state_dict(self) -> dict:
        keys = ("steps", "samples", "samples_since_unload", "steps_since_unload", "unloads")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


# -------------------------------------------------------------------------- schedule


class StageLR:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR`` that knows about unloads.

    ``kind``: constant | linear | cosine (decay to 0 over ``horizon_steps``), after a
    linear warm-up of ``warmup_steps``. ``on_unload='restart'`` counts the schedule from
    the last unload (the paper resets the scheduler state); ``'continue'`` ignores
    unloads. ``rewarmup_steps`` multiplies the LR by a linear ramp after every unload
    (ReLoRA's jagged schedule). Being a callable object, its state is saved by LambdaLR's
    ``state_dict``.
    """

    def __init__(self, kind="constant", warmup_steps=0, horizon_steps=None, on_unload="restart",
                 rewarmup_steps=0):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}")
        if on_unload not in ("restart", "continue"):
            raise ValueError(f"unknown scheduler_on_unload {on_unload!r}")
        if kind != "constant" and not horizon_steps:
            raise ValueError(f"schedule {kind!r} needs horizon_steps")
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.horizon_steps = horizon_steps
        self.on_unload = on_unload
        self.rewarmup_steps = rewarmup_steps
        self.stage_start = 0
        self.unloads = 0

    def __call__(self, step: int) -> float:
        since = step - self.stage_start
        t = since if self.on_unload == "restart" else step
        f = 1.0
        if self.warmup_steps and t < self.warmup_steps:
            f = (t + 1) / self.warmup_steps
        elif self.kind != "constant":
            progress = min(1.0, (t - self.warmup_steps) / max(1, self.horizon_steps - self.warmup_steps))
            f = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.unloads and self.rewarmup_steps and since < self.rewarmup_steps:
            f *= (since + 1) / self.rewarmup_steps
        return f

    def mark_unload(self, step: int) -> None:
        self.unloads += 1
        self.stage_start = step


def make_scheduler(optimizer, schedule: StageLR) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Apply the lambda at the scheduler's current step now (after an unload)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


# ---------------------------------------------------------------------------- ledger


def numerical_rank(bs: list[torch.Tensor], as_: list[torch.Tensor], rtol: float | None = None) -> int:
    """Rank of sum_t B_t A_t from the stacked factors, via two QRs and a small SVD.

    B_cat (d x n) A_cat (n x k) = Q1 (R1 R2^T) Q2^T with n = sum of ranks, so the rank
    is that of the n x n core. Computed in float64; singular values below
    ``rtol * max(d, k) * eps(fp32) * sigma_max`` count as zero (the factors are fp32).
    """
    if not bs:
        return 0
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() for x in as_], dim=0)
    d, k = b.shape[0], a.shape[1]
    r1 = torch.linalg.qr(b, mode="r").R
    r2 = torch.linalg.qr(a.T, mode="r").R
    sv = torch.linalg.svdvals(r1 @ r2.T)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(d, k) * torch.finfo(torch.float32).eps) * sv[0]
    return int((sv > tol).sum())


def merge_stage(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """One stage's merge, W + B A, in fp32 (the caller casts once to the weight's dtype).

    The unload and the ledger's replay both call this, on the same device, so a backbone
    rebuilt from W_0 and the ledger is bit-identical to the one training produced.
    """
    delta = b @ a
    if fan_in_fan_out:
        delta = delta.T
    return w.float() + delta.to(w.device)


def _rank_from_grams(gb: torch.Tensor, ga: torch.Tensor, d: int, k: int, rtol: float | None) -> int:
    """Rank of B A from G_B = B^T B and G_A = A A^T (both n x n, float64).

    B = U_B S_B V_B^T and A^T = U_A S_A V_A^T with (V, S^2) the eigen-pairs of the Grams, so
    the singular values of B A are those of S_B V_B^T V_A S_A (n x n). Eigenvalues of a Gram
    carry an absolute error of ~eps64 * lambda_max, i.e. ~1.5e-8 * sigma_max on the
    singular values: far below the fp32-based tolerance, so the rank equals
    :func:`numerical_rank`'s on the same factors.
    """
    lb, vb = torch.linalg.eigh(gb)
    la, va = torch.linalg.eigh(ga)
    core = (lb.clamp_min(0).sqrt()[:, None] * (vb.T @ va)) * la.clamp_min(0).sqrt()[None, :]
    sv = torch.linalg.svdvals(core)
    if sv.numel() == 0 or sv[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(d, k) * torch.finfo(torch.float32).eps) * sv[0]
    return int((sv > tol).sum())


class UnloadLedger:
    """Per layer, the fp32 factors merged at each stage: W_T = W_0 + sum_t B_t A_t.

    Beside the factors it keeps each layer's Gram matrices G_B = B_cat^T B_cat and
    G_A = A_cat A_cat^T (n x n, n = T r, float64), extended at every :meth:`add` by the new
    factors' cross products with the old ones: O((d + k) T r^2) per layer and stage instead
    of the O((d + k) (T r)^2) QRs of :func:`numerical_rank`, and the rank (:meth:`rank`) is
    then computed from n x n matrices only. In a data-parallel run one rank holds it
    (the unloader's ``hold_ledger``).
    """

    def __init__(self):
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._grams: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # G_B, G_A, stages in them

    def add(self, layer: str, b: torch.Tensor, a: torch.Tensor) -> None:
        entry = (b.detach().float().cpu().clone(), a.detach().float().cpu().clone())
        self.factors.setdefault(layer, []).append(entry)
        self._update_grams(layer)

    def _update_grams(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the layer's Grams by the stages added since the last call."""
        entries = self.factors[layer]
        gb, ga, done = self._grams.get(layer, (None, None, 0))
        for i in range(done, len(entries)):
            bd, ad = entries[i][0].double(), entries[i][1].double()
            bb, aa = bd.T @ bd, ad @ ad.T
            if gb is None:
                gb, ga = bb, aa
                continue
            cb = torch.cat([ob.double().T @ bd for ob, _ in entries[:i]], dim=0)  # (n x r)
            ca = torch.cat([oa.double() @ ad.T for _, oa in entries[:i]], dim=0)
            gb = torch.cat([torch.cat([gb, cb], 1), torch.cat([cb.T, bb], 1)], 0)
            ga = torch.cat([torch.cat([ga, ca], 1), torch.cat([ca.T, aa], 1)], 0)
        self._grams[layer] = (gb, ga, len(entries))
        return gb, ga

    @property
    def num_stages(self) -> int:
        return max((len(v) for v in self.factors.values()), default=0)

    def delta(self, layer: str) -> torch.Tensor:
        """The accumulated update (d x k, fp32, in nn.Linear's (out, in) layout)."""
        bs, as_ = zip(*self.factors[layer])
        return torch.cat(bs, dim=1) @ torch.cat(as_, dim=0)

    def rebuild(self, layer: str, w0: torch.Tensor) -> torch.Tensor:
        """W_0 + sum_t B_t A_t in one fp32 pass (not bit-equal to training: see :meth:`replay`)."""
        return w0.float() + self.delta(layer).to(w0.device)

    def replay(self, layer: str, w0: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
        """W_T as training produced it, bit for bit: every stage's merge in order, each
        cast to W_0's dtype, on W_0's device (a bf16 W_T differs from the one-pass
        :meth:`rebuild` by the T intermediate roundings)."""
        w = w0
        for b, a in self.factors.get(layer, []):
            w = merge_stage(w, b.to(w.device), a.to(w.device), fan_in_fan_out).to(w0.dtype)
        return w

    def rank(self, layer: str, rtol: float | None = None) -> int:
        """Numerical rank of the accumulated update (same rule as :func:`numerical_rank`)."""
        entries = self.factors.get(layer)
        if not entries:
            return 0
        gb, ga = self._update_grams(layer)
        return _rank_from_grams(gb, ga, entries[0][0].shape[0], entries[0][1].shape[1], rtol)

    def ranks(self, rtol: float | None = None) -> dict[str, int]:
        return {name: self.rank(name, rtol) for name in self.factors}

    def nbytes(self) -> int:
        return sum(b.nbytes + a.nbytes for entries in self.factors.values() for b, a in entries)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, entries in self.factors.items():
            for t, (b, a) in enumerate(entries):
                out[f"{name}@{t}.B"] = b
                out[f"{name}@{t}.A"] = a
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.factors, self._grams = {}, {}
        keys = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda k: (k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])))
        for key in keys:  # the Grams are built on the first rank() call, if any
            self.factors.setdefault(key.rsplit("@", 1)[0], []).append((state[key + ".B"], state[key + ".A"]))

    def save(self, path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path) -> "UnloadLedger":
        ledger = cls()
        ledger.load_state_dict(load_file(str(path)))
        return ledger


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (identifies a base model's weights)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -------------------------------------------------------------------------- unloader


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


def prune_by_magnitude(t: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` fraction of entries of smallest magnitude, in place."""
    n = t.numel()
    keep = n - int(math.floor(ratio * n))
    if keep <= 0:
        t.zero_()
        return
    flat = t.view(-1)
    idx = flat.abs().topk(keep).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[idx] = True
    flat.masked_fill_(~mask, 0)


class LocalAccess:
    """How the unloader reads and writes parameters and optimizer state: directly.

    Engines that keep their own copies (DeepSpeed ZeRO: partitioned weights, an fp32 master
    copy and partitioned moments inside the optimizer) provide a subclass; the algorithm
    itself never changes.
    """

    def gathered(self, params: Iterable[torch.nn.Parameter], modify: bool = False):
        return contextlib.nullcontext()

    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full parameter in fp32 (the master copy where one exists)."""
        return param.detach().float()

    def write(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))

    def reset_optimizer_state(self, optimizer, params, policy: str, prune_ratio: float) -> None:
        for p in params:
            if policy == "reset":
                optimizer.state.pop(p, None)  # AdamW re-creates step, exp_avg, exp_avg_sq at 0
            elif policy == "prune":
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state.get(p, {}):
                        prune_by_magnitude(optimizer.state[p][key], prune_ratio)


def _lap(parts: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    parts[key] += now - since
    return now


@dataclass
class UnloadEvent:
    stage: int  # stages completed after this unload (1 for the first)
    step: int
    samples: int
    seconds: float
    ranks: dict[str, int] = field(default_factory=dict)
    output_change: float | None = None  # max |logits after - before| / max |before|, if measured
    parts: dict[str, float] = field(default_factory=dict)  # seconds: merge, ledger, reinit, ...

    @property
    def mean_rank(self) -> float:
        return sum(self.ranks.values()) / len(self.ranks) if self.ranks else 0.0

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


class PeriodicUnloader:
    """Merges the adapter into the backbone at unload points and resets what PLoRA resets.

    ``optimizer``/``scheduler`` may be None (pure algorithm tests). ``clock`` decides when;
    :meth:`after_step` advances it and unloads when due; :meth:`unload` does it now.
    """

    def __init__(self, model, optimizer=None, scheduler=None, *, clock: UnloadClock | None = None,
                 momentum: float = 0.0, momentum_rule: str = "preserve",
                 optimizer_on_unload: str = "reset", prune_ratio: float = 0.99,
                 init_a: str = "kaiming", seed: int = 0, keep_ledger: bool = True,
                 hold_ledger: bool = True, adapter: str = ADAPTER, access: LocalAccess | None = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum_rule not in MOMENTUM_RULES:
            raise ValueError(f"momentum_rule must be one of {MOMENTUM_RULES}")
        if optimizer_on_unload not in OPTIMIZER_ON_UNLOAD:
            raise ValueError(f"optimizer_on_unload must be one of {OPTIMIZER_ON_UNLOAD}")
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
        # keep_ledger: the run records its unloads (checkpoints store the ledger instead of
        # the backbone); hold_ledger: this process holds it (one data-parallel rank suffices)
        self.keeps_ledger = keep_ledger
        self.ledger = UnloadLedger() if keep_ledger and hold_ledger else None
        self.base_digest = self._digest_base() if keep_ledger else None
        self.stage = 0

    def base_weights(self) -> dict[str, torch.nn.Parameter]:
        return {name: layer.get_base_layer().weight for name, layer in self.layers.items()}

    def _digest_base(self) -> str:
        """Digest of W_0 (the target layers' weights before any unload): a factored
        checkpoint is only valid on the same base model. Collective under ZeRO-3."""
        def tensors():
            for name, w in self.base_weights().items():
                with self.access.gathered([w]):
                    yield name, w.detach().cpu()  # gathered views die with the context
        return weights_digest(tensors())

    @classmethod
    def from_config(cls, model, optimizer, scheduler, plora_cfg, lora_cfg, seed=0, access=None):
        """Under torch.distributed only rank 0 holds the ledger (and measures the rank):
        every rank merges the same factors, so one copy in host memory is enough."""
        hold = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_rank() == 0
        clock = UnloadClock(plora_cfg.unload_every_samples, plora_cfg.unload_every_steps)
        return cls(model, optimizer, scheduler, clock=clock, momentum=plora_cfg.momentum,
                   momentum_rule=plora_cfg.momentum_rule,
                   optimizer_on_unload=plora_cfg.optimizer_on_unload,
                   prune_ratio=plora_cfg.prune_ratio, init_a=lora_cfg.init_a, seed=seed,
                   keep_ledger=plora_cfg.ledger, hold_ledger=hold, access=access)

    def _reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        if self.optimizer is None or self.optimizer_on_unload == "keep":
            return
        self.access.reset_optimizer_state(self.optimizer, params, self.optimizer_on_unload, self.prune_ratio)

    # -- the algorithm ------------------------------------------------------------

    def after_step(self, samples: int) -> UnloadEvent | None:
        """Advance the clock by one optimizer step of ``samples``; unload when due."""
        return self.unload() if self.clock.step(samples) else None

    @torch.no_grad()
    def unload(self) -> UnloadEvent:
        t0 = time.perf_counter()
        parts = dict.fromkeys(("merge", "ledger", "reinit", "optimizer", "rank"), 0.0)
        m = self.momentum
        c = 1.0 - m
        ad = self.adapter
        for index, (name, layer) in enumerate(self.layers.items()):
            lora_a, lora_b = layer.lora_A[ad].weight, layer.lora_B[ad].weight
            base = layer.get_base_layer().weight
            with self.access.gathered([base, lora_a, lora_b], modify=True):
                t = time.perf_counter()
                a = self.access.read(lora_a)
                b_full = self.access.read(lora_b)
                b = b_full * (c * layer.scaling[ad])
                # fp32 sum, cast once to the backbone dtype: the ledger's replay does the same
                merged = merge_stage(self.access.read(base), b.to(base.device), a.to(base.device),
                                     getattr(layer, "fan_in_fan_out", False))
                self.access.write(base, merged)
                t = _lap(parts, "merge", t)
                if self.ledger is not None:
                    self.ledger.add(name, b, a)
                t = _lap(parts, "ledger", t)
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
                _lap(parts, "reinit", t)
        t = time.perf_counter()
        self._reset_optimizer_state(lora_parameters(self.model, ad))
        if self.scheduler is not None:
            for fn in self.scheduler.lr_lambdas:
                if isinstance(fn, StageLR):
                    fn.mark_unload(self.scheduler.last_epoch)
            refresh_lr(self.scheduler)
        t = _lap(parts, "optimizer", t)
        self.stage += 1
        ranks = self.ledger.ranks() if self.ledger is not None else {}
        _lap(parts, "rank", t)
        return UnloadEvent(stage=self.stage, step=self.clock.steps, samples=self.clock.samples,
                           seconds=time.perf_counter() - t0, ranks=ranks, parts=parts)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "clock": self.clock.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.clock.load_state_dict(state["clock"])

