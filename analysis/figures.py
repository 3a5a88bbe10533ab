"""Report figures (matplotlib, Agg): every PNG is FIGSIZE at DPI, i.e. 800 x 450 pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis import stats
from analysis.results import LEVEL, item_scores
from analysis.store import Sweep, Trial

FIGSIZE = (8, 4.5)
DPI = 100
MAX_LEGEND = 12


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average: point i is the mean of values[max(0, i-window+1) : i+1]."""
    y = np.asarray(values, float)
    if window <= 1 or y.size == 0:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, y.size + 1)
    start = np.maximum(0, i - window)
    return (c[i] - c[start]) / (i - start)


def fitting_window(window: int, points: int) -> int:
    """The smoothing window a curve of `points` points can take: a window wider than a fifth
    of the curve turns a short curve into its running mean (the paper's windows, 150 steps
    and 10 checkpoints, were for hundreds of points), so it shrinks, down to no smoothing."""
    return max(1, min(window, points // 5))


def samples_axis(trial: Trial, steps) -> tuple[np.ndarray, str]:
    """x positions of `steps` in training samples (train/samples), else the steps themselves."""
    s_steps, s_values = trial.history("train/samples")
    if len(s_steps) >= 1:
        return np.interp(steps, s_steps, s_values), "training samples"
    return np.asarray(steps, float), "step"


def unload_steps(trial: Trial) -> list[int]:
    return trial.history("plora/stage")[0]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _legend(ax, n: int) -> None:
    if 0 < n <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")


def _label(trial: Trial) -> str:
    return trial.name + (" (running)" if trial.running else "")


def _mark_unloads(ax, t, steps, y, color) -> None:
    """A tick on the curve at each unload inside the curve's steps."""
    unloads = [s for s in unload_steps(t) if steps[0] <= s <= steps[-1]]
    if unloads:
        ux, _ = samples_axis(t, unloads)
        ax.scatter(ux, np.interp(unloads, steps, y), marker="|", s=40, color=color)


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(i: int) -> dict:
    """Trial i's line: its own colour, dash pattern and marker, so curves that lie on each
    other (the same data in the same order) stay apart in print and for colour-blind readers."""
    return {"color": f"C{i % 10}", "ls": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)], "ms": 3}


def _every(points: int, i: int, n: int) -> tuple[int, int]:
    """About 8 markers on a curve, staggered by trial so that curves on top of each other do not
    hide each other's markers."""
    every = max(1, points // 8)
    return (i * every // max(1, n)) % every, every


def loss_reference(trials: list[Trial]) -> Trial | None:
    """The trial the others' losses are compared with: a LoRA trial (same rank, then same seed,
    as the first PLoRA trial), else the first trial."""
    if not trials:
        return None
    loras = [t for t in trials if t.param("method") == "lora"]
    if not loras:
        return trials[0]
    first = next((t for t in trials if t.param("method") == "plora"), trials[0])
    return max(loras, key=lambda t: (t.param("lora.rank") == first.param("lora.rank"), t.seed == first.seed))


def train_loss_figure(sweep: Sweep, path: Path, window: int = 150) -> Path | None:
    """:func:`train_loss_plot` as a PNG at `path`; None when no trial has a training loss."""
    fig = train_loss_plot(sweep, window)
    return None if fig is None else _save(fig, path)


def train_loss_plot(sweep: Sweep, window: int = 150):
    """Three panels on one x axis (training samples): each trial's training loss (moving
    average); its difference to a reference trial (a LoRA one; the trials see the same batches,
    so their curves lie on each other while their differences do not); and where each trial
    unloaded (one row of ticks per trial, named on the left). The matplotlib figure, or None."""
    curves = []  # (style index: the trial's place in the sweep, the same in every figure, ...)
    for i, t in enumerate(sweep.trials):
        steps, loss = t.history("train/loss")
        if steps:
            curves.append((i, t, steps, loss))
    if not curves:
        return None
    requested = window
    used = max(fitting_window(requested, len(loss)) for *_, loss in curves)
    unloading = [(i, t) for i, t, _, _ in curves if unload_steps(t)]
    plt = _plt()
    fig = plt.figure(figsize=FIGSIZE)
    grid = fig.add_gridspec(3 if unloading else 2, 1, height_ratios=[3, 2, 1.2][:3 if unloading else 2])
    ax = fig.add_subplot(grid[0])
    delta = fig.add_subplot(grid[1], sharex=ax)
    ref = loss_reference([t for _, t, _, _ in curves])
    smoothed = {}
    xlabel = "step"
    for i, t, steps, loss in curves:
        x, xlabel = samples_axis(t, steps)
        y = smooth(loss, fitting_window(requested, len(loss)))
        smoothed[t.run_id] = (x, y)
        ax.plot(x, y, lw=1, markevery=_every(len(x), i, len(curves)), label=_label(t), **_style(i))
    rx, ry = smoothed[ref.run_id]
    for i, t, _, _ in curves:
        x, y = smoothed[t.run_id]
        inside = (x >= rx[0]) & (x <= rx[-1])
        if t is not ref and inside.any():
            delta.plot(x[inside], y[inside] - np.interp(x[inside], rx, ry), lw=1,
                       markevery=_every(int(inside.sum()), i, len(curves)), **_style(i))
    delta.axhline(0, color="0.3", lw=0.8)
    delta.set_ylabel(f"Δ to {ref.name}", fontsize=8)
    ax.set_ylabel("training loss" + (f"\n(moving average, {used} steps)" if used > 1 else ""), fontsize=8)
    ax.set_title("Training loss per trial; below: its difference to "
                 f"{ref.name}{' and where each trial unloaded' if unloading else ''}", fontsize=9)
    _legend(ax, len(curves))
    bottom = delta
    if unloading:
        rug = fig.add_subplot(grid[2], sharex=ax)
        for row, (i, t) in enumerate(unloading):
            ux, _ = samples_axis(t, unload_steps(t))
            rug.scatter(ux, [row] * len(ux), marker="|", s=30, color=_style(i)["color"])
        rug.set_yticks(range(len(unloading)),
                       [t.name for _, t in unloading] if len(unloading) <= MAX_LEGEND else [""] * len(unloading),
                       fontsize=6)
        rug.set_ylim(-0.7, len(unloading) - 0.3)
        rug.set_ylabel("unloads", fontsize=8)
        bottom = rug
    for a in fig.axes:
        if a is not bottom:
            a.tick_params(labelbottom=False)
    bottom.set_xlabel(xlabel)
    return fig


def _band(t: Trial, metric: str, steps, values, z: float):
    """(lo, hi) per checkpoint: Wilson's interval where the checkpoint's items are 0/1 (an
    accuracy: the band stays inside [0, 1]), else value ± z·stderr; None without either."""
    se_steps, se = t.history(metric + "_stderr")
    se = dict(zip(se_steps, se))
    lo, hi = [], []
    for step, value in zip(steps, values):
        found = item_scores(t.items(step), metric)
        if found is not None and stats.is_proportion(found[1]):
            a, b = stats.wilson_interval(value, len(found[1]), LEVEL)
        elif step in se:
            a, b = value - z * se[step], value + z * se[step]
        else:
            return None
        lo.append(a)
        hi.append(b)
    return np.asarray(lo), np.asarray(hi)


def eval_figure(sweep: Sweep, metric: str, path: Path, window: int = 10) -> Path | None:
    """`metric` per checkpoint per trial, smoothed over `window` checkpoints; the band smooths
    the per-checkpoint 95 % intervals (Wilson's for an accuracy, else value ± z·stderr) the
    same way."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xlabel, drawn = "step", 0
    requested, used = window, 1
    z = stats.normal_interval(0.0, 1.0, LEVEL)[1]
    for i, t in enumerate(sweep.trials):
        steps, values = t.history(metric)
        if not steps:
            continue
        x, xlabel = samples_axis(t, steps)
        window = fitting_window(requested, len(values))
        used = max(used, window)
        y = smooth(values, window)
        style = {**_style(i), "marker": _style(i)["marker"] if len(steps) < 30 else None}
        line, = ax.plot(x, y, lw=1, label=_label(t), **style)
        band = _band(t, metric, steps, values, z)
        if band is not None:
            ax.fill_between(x, smooth(band[0], window), smooth(band[1], window),
                            color=line.get_color(), alpha=0.12, lw=0)
        _mark_unloads(ax, t, steps, y, line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric + (f" (moving average, {used} checkpoints)" if used > 1 else ""))
    ax.set_title(f"{metric} per checkpoint ({int(LEVEL * 100)}% band; | : unload)")
    _legend(ax, drawn)
    return _save(fig, path)


def rank_figure(sweep: Sweep, path: Path) -> Path | None:
    """Accumulated update rank per stage (mean over layers, min–max band) against T·r."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    drawn, top, references = 0, 0.0, {}
    for i, t in enumerate(sweep.trials):
        steps, stage = t.history("plora/stage")
        _, rank = t.history("plora/accumulated_rank")
        if not steps or len(rank) != len(stage):
            continue
        line, = ax.plot(stage, rank, lw=1, label=_label(t), **_style(i))
        _, lo = t.history("plora/accumulated_rank_min")
        _, hi = t.history("plora/accumulated_rank_max")
        if len(lo) == len(stage) == len(hi):
            ax.fill_between(stage, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        r = t.param("lora.rank")
        if isinstance(r, (int, float)):
            references[r] = max(references.get(r, 0), max(stage))
        top = max(top, max(rank))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for r, last in sorted(references.items()):  # the bound an unload adds at most r to
        ax.plot([0, last], [0, last * r], ls="--", lw=0.8, color="0.3", label=f"T·r, r={r}")
    ax.set_xlabel("stage T (unloads so far)")
    ax.set_ylabel("accumulated update rank")
    ax.set_title("Accumulated update rank per stage (dashed: T·r)")
    ax.set_ylim(0, top * 1.1 + 1)
    _legend(ax, drawn + len(references))
    return _save(fig, path)


def importance_figure(importances: dict, path: Path) -> Path | None:
    fan, ped = importances.get("fanova") or {}, importances.get("ped_anova") or {}
    names = list(fan) or list(ped)
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    y = np.arange(len(names))
    ax.barh(y - 0.2, [fan.get(n, 0) for n in names], height=0.4, label="fANOVA")
    ax.barh(y + 0.2, [ped.get(n, 0) for n in names], height=0.4, label="PED-ANOVA")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("importance (normalized)")
    budget = importances.get("budget_step")
    ax.set_title(f"What mattered most for {importances['metric']} "
                 f"({importances['n_trials']} completed trials"
                 + ("" if budget is None else f", best up to step {budget}") + ")")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_figure(points: list[dict], metric: str, path: Path) -> Path | None:
    """Metric against training samples and wall time; Pareto-optimal trials joined."""
    if not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, sharey=True)
    for ax, cost, label in ((axes[0], "samples", "training samples"),
                            (axes[1], "seconds", "wall time (s)")):
        pts = [p for p in points if not math.isnan(p[cost])]
        ax.scatter([p[cost] for p in pts], [p["value"] for p in pts], s=12, color="0.5")
        front = sorted((p for p in pts if p[f"pareto_{cost}"]), key=lambda p: p[cost])
        ax.plot([p[cost] for p in front], [p["value"] for p in front], "o-", color="C3",
                ms=4, label="Pareto front")
        ax.set_xlabel(label)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{metric} vs training cost")
    return _save(fig, path)
