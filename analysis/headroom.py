"""Headroom: how far full fine-tuning is ahead of LoRA, and how much of that gap PLoRA closes.

For a sweep holding LoRA and full-FT trials (the `method` param), and PLoRA for the fraction:
per method, the configuration with the best mean of the sweep metric over its seeds (each trial
at its best checkpoint) is the one compared; LoRA and PLoRA at the same rank (one comparison per
rank), full FT's best overall. Each metric (the sweep metric, the training-set loss
`eval/train/loss` and the held-out loss `eval/heldout/loss`, where logged) is read at each
trial's best checkpoint by that metric: the best the run reached within its budget.

* **gap** = LoRA − full FT, signed so that a positive gap means full FT is better (for an
  accuracy: full FT − LoRA);
* **fraction closed** = (LoRA − PLoRA) / (LoRA − full FT): 0 is LoRA, 1 is full FT.

Both come with 95 % intervals paired two ways (as `paired.py` pairs PLoRA − LoRA):
* **seeds**: runs paired by seed value (the same seeds for each method; needs two or more):
  a t interval of the per-seed gaps; Fieller's interval of the fraction (the ratio of the two
  paired mean differences);
* **items**: per-item scores averaged over each method's seeds, then a paired bootstrap over
  the items every method scored (token-weighted for a loss): the difference of means for the
  gap, the ratio of the mean differences for the fraction.

There is headroom only when every interval of the gap excludes 0 with full FT ahead; otherwise
there is no gap to close, and no fraction is given. The fraction is judged the same way
against 0 (LoRA) and 1 (full FT). With one seed a side only the items are paired: that
interval covers which items were drawn, not what another seed would do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analysis import stats
from analysis.learning import LOSS_TARGETS, Ability, _method, ability, best_value
from analysis.paired import _seed_interval
from analysis.results import Config, checkpoint_step, eval_metric_keys, group_configs, item_scores, selection_metric
from analysis.stats import LEVEL
from analysis.store import Sweep, Trial, lower_is_better

DEFINITION = __doc__.split("\n", 2)[2].strip()
NONE = {"value": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}


@dataclass
class Gap:
    metric: str
    lower: bool
    values: dict           # method -> mean over its seeds (at each trial's best checkpoint)
    gap: dict              # {"value", "lo", "hi", "n"} paired by seed
    gap_items: dict        # the same, paired over items
    fraction: dict | None = None        # by seed (Fieller); None without PLoRA or headroom
    fraction_items: dict | None = None  # over items (bootstrap of the ratio)

    @staticmethod
    def _intervals(*found) -> list[dict]:
        return [d for d in found if d and not (math.isnan(d["lo"]) or math.isnan(d["hi"]))]

    @property
    def headroom(self) -> bool:
        """Full FT ahead of LoRA by more than the noise: every interval of the gap above 0."""
        found = self._intervals(self.gap, self.gap_items)
        return bool(found) and all(d["lo"] > 0 for d in found)

    def verdict(self) -> str:
        found = self._intervals(self.gap, self.gap_items)
        if not found:
            return "no interval (one seed a side and no per-item results): cannot tell"
        if not self.headroom:
            if all(d["hi"] < 0 for d in found):
                return "LoRA ahead of full FT: no headroom to close"
            return "full FT not distinguishable from LoRA: no headroom to close"
        if self.fraction is None and self.fraction_items is None:
            return "headroom: full FT ahead of LoRA"
        fr = self._intervals(self.fraction, self.fraction_items)
        if not fr:
            return "headroom; the fraction PLoRA closes has no interval"
        above0, below0 = all(d["lo"] > 0 for d in fr), all(d["hi"] < 0 for d in fr)
        above1, below1 = all(d["lo"] > 1 for d in fr), all(d["hi"] < 1 for d in fr)
        if below0:
            return "PLoRA behind LoRA"
        if above1:
            return "PLoRA beyond full FT"
        if above0 and below1:
            return "PLoRA closes part of the gap: ahead of LoRA, short of full FT"
        if above0:
            return "PLoRA ahead of LoRA, not distinguishable from full FT"
        if below1:
            return "PLoRA not distinguishable from LoRA: full FT stays ahead"
        return "the fraction's interval spans both LoRA (0) and full FT (1): undecided"


@dataclass
class Headroom:
    rank: object
    lora: Config
    full: Config
    plora: Config | None
    select: str
    gaps: list[Gap] = field(default_factory=list)
    abilities: list[Ability] = field(default_factory=list)


def fieller(num: list[float], den: list[float], level: float = LEVEL) -> dict:
    """mean(num) / mean(den) over paired values with Fieller's interval: the ratios r for which
    the t interval of mean(num − r·den) holds 0. Unbounded (nan) when mean(den) is not
    distinguishable from 0 by its own t interval; needs two pairs or more."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    n = a.size
    out = {"value": float(a.mean() / b.mean()) if n and b.mean() else math.nan,
           "lo": math.nan, "hi": math.nan, "n": int(n)}
    if n < 2:
        return out
    q = stats.t_quantile(0.5 + level / 2, n - 1) ** 2 / n
    saa, sbb = a.var(ddof=1), b.var(ddof=1)
    sab = float(np.cov(a, b, ddof=1)[0, 1])
    ma, mb = a.mean(), b.mean()
    qa, qb, qc = mb * mb - q * sbb, ma * mb - q * sab, ma * ma - q * saa
    if qa <= 0:
        return out
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))
    out.update(lo=(qb - root) / qa, hi=(qb + root) / qa)
    return out


def ratio_bootstrap(num, den, weights=None, n_boot: int = 2000, seed: int = 0,
                    level: float = LEVEL) -> dict:
    """sum(w·num) / sum(w·den) over paired items with a percentile bootstrap interval (items
    resampled together, as ``stats.paired_bootstrap`` resamples them)."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    w = np.ones(a.size) if weights is None else np.asarray(weights, float)
    n = a.size
    if n == 0 or not (b * w).sum():
        return dict(NONE, n=int(n))
    rng = np.random.default_rng(seed)
    block, boots, done = max(1, min(n_boot, 4_000_000 // n)), [], 0
    while done < n_boot:
        idx = rng.integers(0, n, size=(min(block, n_boot - done), n))
        with np.errstate(divide="ignore", invalid="ignore"):
            boots.append((a * w)[idx].sum(axis=1) / (b * w)[idx].sum(axis=1))
        done += idx.shape[0]
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(np.concatenate(boots), [tail, 100 - tail])
    return {"value": float((a * w).sum() / (b * w).sum()), "lo": float(lo), "hi": float(hi), "n": int(n)}


# ----------------------------------------------------------------------------- the comparison


def _score(config: Config, metric: str, lower: bool) -> float:
    values = [v for v in (best_value(t, metric, lower) for t in config.trials) if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _best(configs: list[Config], metric: str, lower: bool) -> Config | None:
    scored = [(c, _score(c, metric, lower)) for c in configs]
    scored = [(c, s) for c, s in scored if not math.isnan(s)]
    if not scored:
        return None
    sign = 1 if lower else -1
    return min(scored, key=lambda cs: (sign * cs[1], -len(cs[0].trials)))[0]


def _at_best(trial: Trial, metric: str, lower: bool) -> tuple[int | None, float]:
    step = checkpoint_step(trial, metric, lower, "best")
    return step, (math.nan if step is None else trial.value_at(metric, step))


def _items(trials: list[Trial], metric: str, lower: bool):
    """({id: score averaged over the trials}, {id: weight} or None) at each trial's best
    checkpoint by ``metric``; None when a trial has no per-item results."""
    found = []
    for t in trials:
        step, _ = _at_best(t, metric, lower)
        scores = None if step is None else item_scores(t.items(step), metric)
        if scores is None:
            return None
        found.append(scores)
    per_trial = [dict(zip(f[0], f[1].tolist())) for f in found]
    ids = set.intersection(*(set(d) for d in per_trial))
    mean = {i: sum(d[i] for d in per_trial) / len(per_trial) for i in ids}
    w = found[0][2]
    return mean, (None if w is None else dict(zip(found[0][0], w.tolist())))


def _paired_seeds(configs: list[Config]) -> list[list[Trial]]:
    """Per seed every configuration ran: the trials, one per configuration."""
    seeds = [s for s in dict.fromkeys(t.seed for t in configs[0].trials)
             if all(any(t.seed == s for t in c.trials) for c in configs[1:])]
    return [[next(t for t in c.trials if t.seed == s) for c in configs] for s in seeds]


def _paired(configs: list[Config], metric: str, lower: bool):
    """(rows, cols, weights): per seed all ``configs`` ran, their values (at each trial's best
    checkpoint); per configuration its per-item scores averaged over those seeds (all its
    seeds when none is shared), on the items all scored (cols None without per-item results)."""
    sets = _paired_seeds(configs)
    rows = [[_at_best(t, metric, lower)[1] for t in ts] for ts in sets]
    rows = [r for r in rows if not any(math.isnan(v) for v in r)]
    items = [_items([ts[k] for ts in sets] or c.trials, metric, lower) for k, c in enumerate(configs)]
    if any(i is None for i in items):
        return rows, None, None
    ids = sorted(set.intersection(*(set(i[0]) for i in items)))
    if not ids:
        return rows, None, None
    cols = [np.array([i[0][k] for k in ids]) for i in items]
    return rows, cols, (None if items[0][1] is None else [items[0][1][k] for k in ids])


def gap_for(metric: str, lower: bool, lora: Config, full: Config, plora: Config | None) -> Gap | None:
    values = {}
    for name, c in (("lora", lora), ("full", full), ("plora", plora)):
        vs = [] if c is None else [v for v in (_at_best(t, metric, lower)[1] for t in c.trials)
                                   if not math.isnan(v)]
        values[name] = float(np.mean(vs)) if vs else math.nan
    if math.isnan(values["lora"]) or math.isnan(values["full"]):
        return None
    sign = 1 if lower else -1  # a positive gap: full FT better
    rows, cols, w = _paired([lora, full], metric, lower)
    g = _seed_interval([sign * (r[0] - r[1]) for r in rows]) if rows else {"diff": math.nan, "n": 0}
    gap = Gap(metric, lower, values, {**NONE, **g, "value": g["diff"]}, dict(NONE))
    del gap.gap["diff"]
    if cols is not None:
        res = stats.paired_bootstrap(*(cols if lower else cols[::-1]), weights=w, level=LEVEL)
        gap.gap_items = {"value": res["diff"], "lo": res["lo"], "hi": res["hi"], "n": res["n"]}
    if math.isnan(values["plora"]) or not gap.headroom:
        return gap  # no PLoRA value, or no gap to close: no fraction
    rows, cols, w = _paired([lora, full, plora], metric, lower)
    gap.fraction = fieller([r[0] - r[2] for r in rows], [r[0] - r[1] for r in rows]) if rows else dict(NONE)
    if cols is not None:
        gap.fraction_items = ratio_bootstrap(cols[0] - cols[2], cols[0] - cols[1], w)
    return gap


def headroom(sweep: Sweep) -> list[Headroom]:
    """One comparison per LoRA rank that has a LoRA configuration, when full FT ran too."""
    select, lower = selection_metric(sweep)
    if select is None:
        return []
    configs, _ = group_configs(sweep.trials)
    by_method = {m: [c for c in configs if _method(c) == m] for m in ("lora", "plora", "full")}
    full = _best(by_method["full"], select, lower)
    if full is None:
        return []
    keys = eval_metric_keys(sweep.trials)
    metrics = list(dict.fromkeys([select] + [m for _, m in LOSS_TARGETS[::-1] if m in keys]))
    out = []
    for rank in dict.fromkeys(c.trials[0].param("lora.rank") for c in by_method["lora"]):
        lora = _best([c for c in by_method["lora"] if c.trials[0].param("lora.rank") == rank], select, lower)
        plora = _best([c for c in by_method["plora"] if c.trials[0].param("lora.rank") == rank], select, lower)
        if lora is None:
            continue
        h = Headroom(rank, lora, full, plora, select)
        for m in metrics:
            found = gap_for(m, lower_is_better(m, sweep), lora, full, plora)
            if found is not None:
                h.gaps.append(found)
        if plora is not None:
            h.abilities = [a for label, m in LOSS_TARGETS if m in keys
                           for a in [ability(sweep, plora, lora, m, label)] if a is not None]
        out.append(h)
    return out


# ----------------------------------------------------------------------------- the report


def _num(d: dict | None, digits: int = 3, signed: bool = True) -> str:
    if not d or math.isnan(d.get("value", math.nan)):
        return "—"
    return f"{d['value']:+.{digits}f}" if signed else f"{d['value']:.{digits}f}"


def _point(*found: dict | None) -> dict | None:
    """The first of ``found`` with a value."""
    return next((d for d in found if d and not math.isnan(d["value"])), None)


def _span(d: dict | None, digits: int = 3) -> str:
    if not d or math.isnan(d["lo"]) or math.isnan(d["hi"]):
        return "—"
    return f"[{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}] (n={d['n']})"


def _summary(values: tuple) -> str:
    mean, lo, hi = values
    if math.isnan(mean):
        return "—"
    return f"{mean:.3f}" + ("" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")


def section(sweep: Sweep, out_dir, numbers: dict) -> list[str]:
    """The report's "headroom" section (empty without LoRA and full-FT trials); fills
    ``numbers["headroom"]`` and writes ``headroom_rank*.png`` into ``out_dir``."""
    found = headroom(sweep)
    numbers["headroom"] = []
    if not found:
        return []
    md = ["## Headroom: full FT vs LoRA, and the gap PLoRA closes", "", DEFINITION, ""]
    for h in found:
        seeds = lambda c: f"{len(c.trials)} seed{'s' if len(c.trials) > 1 else ''}"  # noqa: E731
        md += ([f"### LoRA rank {h.rank}", ""] if len(found) > 1 else []) + [
               f"Compared, per method the configuration with the best mean `{h.select}` over its seeds: "
               f"LoRA `{h.lora.label()}` ({seeds(h.lora)}); "
               + (f"PLoRA `{h.plora.label()}` ({seeds(h.plora)}); " if h.plora else "no PLoRA at this rank; ")
               + f"full FT `{h.full.label()}` ({seeds(h.full)}).", "",
               "| metric | LoRA | PLoRA | full FT | gap (full FT ahead by) | by seed | by item "
               "| fraction PLoRA closes | by seed | by item | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = []
        for g in h.gaps:
            v = g.values
            md.append(f"| `{g.metric}` | {v['lora']:.4f} | "
                      + ("—" if math.isnan(v.get("plora", math.nan)) else f"{v['plora']:.4f}")
                      + f" | {v['full']:.4f} | {_num(g.gap, 4)} | {_span(g.gap, 4)} | {_span(g.gap_items, 4)} | "
                      f"{_num(_point(g.fraction, g.fraction_items), 2, False)} | {_span(g.fraction, 2)} | "
                      f"{_span(g.fraction_items, 2)} | {g.verdict()} |")
            rows.append({"metric": g.metric, "values": v, "gap": g.gap, "gap_items": g.gap_items,
                         "fraction": g.fraction, "fraction_items": g.fraction_items,
                         "headroom": g.headroom, "verdict": g.verdict()})
        md.append("")
        for g in h.gaps:
            md.append(f"- `{g.metric}`: {g.verdict()}.")
        abilities = []
        if h.abilities:
            md += ["", "Learning ability of this PLoRA against this LoRA (`learning.py`'s definition):", "",
                   "| target | (a) speed n_LoRA/n_PLoRA | (b) best ratio |", "|---|---|---|"]
            for a in h.abilities:
                speed = a.speed_summary()
                speed_text = (f"not reached in {len(a.speed) - a.reached} of {len(a.speed)} seed(s)"
                              if speed is None else _summary(speed) + "×")
                md.append(f"| {a.target} (`{a.metric}`) | {speed_text} | {_summary(a.quality_summary())} |")
                abilities.append({"metric": a.metric, "target": a.target, "speed_per_seed": a.speed,
                                  "speed": None if speed is None else list(speed),
                                  "quality_per_seed": a.quality, "quality": list(a.quality_summary())})
        name = f"headroom_rank{h.rank}.png"
        figure = gap_rank_figure(h, sweep, out_dir / name)
        if figure is not None:
            md += ["", f"![fraction of the gap PLoRA closes per checkpoint vs accumulated rank]({name})"]
            numbers["extra_figures"].append(name)
        md.append("")
        numbers["headroom"].append({
            "rank": h.rank, "select": h.select, "lora": h.lora.label(), "full": h.full.label(),
            "plora": h.plora.label() if h.plora else None, "gaps": rows, "learning_ability": abilities,
            "figure": None if figure is None else name})
    return md


def gap_rank_figure(h: Headroom, sweep: Sweep, path) -> object:
    """Per checkpoint: the fraction of the gap PLoRA closes (the training-set loss where logged,
    else the sweep metric; seed means, Fieller's interval) against PLoRA's accumulated rank
    (``plora/accumulated_rank``: mean over layers and seeds, 0 before the first unload).
    Hollow: the gap at that checkpoint is not distinguishable across seeds. None without PLoRA,
    its rank metric, headroom on that metric, or a checkpoint where full FT is ahead."""
    if h.plora is None:
        return None
    gap = next((g for g in h.gaps if g.metric == LOSS_TARGETS[1][1]), None) or \
        next((g for g in h.gaps if g.metric == h.select), None)
    if gap is None or not gap.headroom:  # no gap to close: a fraction per checkpoint is noise
        return None
    metric, lower = gap.metric, gap.lower
    sets = _paired_seeds([h.lora, h.full, h.plora]) or [[c.trials[0] for c in (h.lora, h.full, h.plora)]]
    if not any(ts[2].history("plora/accumulated_rank")[0] for ts in sets):
        return None
    steps = sorted(set.intersection(*(set(t.history(metric)[0]) for ts in sets for t in ts)))
    sign = 1 if lower else -1
    points = []
    for step in steps:
        vals = np.array([[t.value_at(metric, step) for t in ts] for ts in sets])
        gaps = sign * (vals[:, 0] - vals[:, 1])
        if gaps.mean() <= 0:
            continue
        frac = fieller(vals[:, 0] - vals[:, 2], vals[:, 0] - vals[:, 1])
        g = _seed_interval(gaps.tolist())
        ranks = []
        for ts in sets:
            r_steps, r = ts[2].history("plora/accumulated_rank")
            ranks.append(next((v for s, v in zip(r_steps[::-1], r[::-1]) if s <= step), 0.0))
        points.append((float(np.mean(ranks)), frac, stats.distinguishable(g["lo"], g["hi"]),
                       sets[0][2].samples_at(step)))
    if not points:
        return None
    from analysis.figures import FIGSIZE, _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for x, f, solid, samples in points:
        err = None if math.isnan(f["lo"]) else [[f["value"] - f["lo"]], [f["hi"] - f["value"]]]
        ax.errorbar([x], [f["value"]], yerr=err, fmt="o", color="C0", mfc="C0" if solid else "white", capsize=3)
        if not math.isnan(samples):
            ax.annotate(f"{samples:,.0f}", (x, f["value"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, ls="--", lw=0.8, color="0.4")
    ax.axhline(1, ls="--", lw=0.8, color="0.4")
    ax.set_ylim(max(-1.0, min(-0.1, *(p[1]["value"] for p in points)) - 0.1),
                min(2.0, max(1.1, *(p[1]["value"] for p in points)) + 0.1))
    ax.set_xlabel("PLoRA's accumulated update rank (mean over layers and seeds)")
    ax.set_ylabel(f"fraction of the gap closed ({metric})")
    ax.set_title("Gap PLoRA closes per checkpoint (0: LoRA, 1: full FT; labels: samples; "
                 "hollow: no gap beyond the noise)", fontsize=9)
    return _save(fig, path)
