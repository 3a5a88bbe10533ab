"""The sweep report: Markdown + PNG figures + report.json, logged under `report/` of the
sweep's parent run so the MLflow UI shows them.

    python -m analysis report --experiment unload [--sweep RUN_ID] [--tracking-uri URI] [--out DIR]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from analysis import figures
from analysis.headroom import section as headroom_section
from analysis.importance import MIN_TRIALS, param_importances
from analysis.learning import DEFINITION, learning_ability
from analysis.paired import DEFINITION as PAIRED_DEFINITION
from analysis.paired import method_differences
from analysis.results import build_table, checkpoint_step, eval_metric_keys, selection_metric, show, small_groups
from analysis.stats import LEVEL, MIN_GROUP_ITEMS
from analysis.store import Sweep, load_sweep

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _interval(mean, lo, hi, digits=3) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    if math.isnan(lo) or math.isnan(hi):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ----------------------------------------------------------------------------- Pareto


def pareto_points(sweep: Sweep) -> tuple[list[dict], str | None]:
    """Per trial: its best value of the selection metric and the cost of reaching it (training
    samples and `time/elapsed_s` at that checkpoint); `pareto_<cost>` marks the front."""
    metric, lower = selection_metric(sweep)
    if metric is None:
        return [], None
    points = []
    for t in sweep.trials:
        step = checkpoint_step(t, metric, lower, "best")
        if step is None:
            continue
        t_steps, t_values = t.history("time/elapsed_s")
        seconds = float(np.interp(step, t_steps, t_values)) if t_steps else math.nan
        points.append({"run_id": t.run_id, "trial": t.name, "value": t.value_at(metric, step),
                       "samples": t.samples_at(step), "seconds": seconds,
                       "running": t.running})
    sign = 1 if lower else -1
    for cost in ("samples", "seconds"):
        for p in points:
            p[f"pareto_{cost}"] = not math.isnan(p[cost]) and not any(
                not math.isnan(q[cost]) and q[cost] <= p[cost]
                and sign * q["value"] <= sign * p["value"]
                and (q[cost] < p[cost] or sign * q["value"] < sign * p["value"])
                for q in points)
    return points, metric


# ----------------------------------------------------------------------------- sections


def _signed(d: dict) -> str:
    if math.isnan(d["lo"]) or math.isnan(d["hi"]):
        return "—"
    return f"[{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _table_md(table, select: str | None = None) -> list[str]:
    """The table, the sweep's own metric (``select``) in the first metric column."""
    metrics = ([select] if select in table.metrics else []) + [m for m in table.metrics if m != select]
    head = [*table.varied] if table.varied else ["configuration"]
    short = [m[len("eval/"):] + (" (sweep metric)" if m == select else "") for m in metrics]
    lines = ["| " + " | ".join(head + short + ["seeds", "trainable params"]) + " |",
             "|" + "---|" * (len(head) + len(short) + 2)]
    for i, c in enumerate(table.configs):
        label = [show(c.values[k]) for k in table.varied] if table.varied else [c.label()]
        if c.running:
            label[-1] += " (partial)"
        elif all(t.status == "stopped_early" for t in c.trials):
            samples = max(t.samples_at(max((s for m in metrics for s in t.history(m)[0]),
                                           default=0)) for t in c.trials)
            label[-1] += (" (stopped early" + ("" if math.isnan(samples) else
                                               f" at {samples:,.0f} samples") + ")")
        cells = [table.cells[m][i].text(3) for m in metrics]
        n = max((table.cells[m][i].n_seeds for m in metrics), default=len(c.trials))
        lines.append("| " + " | ".join(label + cells + [str(n), _fmt(table.trainable[i])]) + " |")
    return lines


def _tests_used(table) -> str:
    used = {cell.test for col in table.cells.values() for cell in col if cell.test}
    names = {"paired": "paired bootstrap over the items both checkpoints scored",
             "seeds": "Welch t interval across seeds",
             "unpaired": "unpaired normal interval from the logged stderrs (no per-item results)",
             "none": "no interval available (counted as not distinguishable)"}
    return "; ".join(names[u] for u in sorted(used)) or "—"


def build_report(sweep: Sweep, out_dir: Path, loss_window: int = 150,
                 eval_window: int = 10) -> tuple[str, dict]:
    """(markdown, numbers) for `sweep`; figures written into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    select, lower = selection_metric(sweep)
    running = [t for t in sweep.trials if t.running]
    numbers: dict = {"experiment": sweep.experiment_name, "partial": bool(running),
                     "n_trials": len(sweep.trials), "selection_metric": select,
                     "sweep_run_id": sweep.parent.info.run_id if sweep.parent else None,
                     "extra_figures": []}
    title = sweep.parent.info.run_name if sweep.parent else sweep.experiment_name
    md = [f"# Sweep report: {title}", ""]
    if running:
        md += [f"**PARTIAL: the sweep is still running** — {len(running)} of {len(sweep.trials)} "
               "trials are still training; their rows are marked *(partial)* and use the "
               "checkpoints logged so far.", ""]
    statuses: dict = {}
    for t in sweep.trials:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    md += [f"Experiment `{sweep.experiment_name}`, tracking URI `{sweep.tracking_uri}`; "
           f"{len(sweep.trials)} trials ("
           + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())) + ").", ""]
    numbers.update(tables={}, learning_ability=[], importance=None, pareto=[])
    if select is None:
        md += ["No checkpoint has been evaluated yet (no `eval/*` metric): the tables, learning "
               "ability, importance and cost sections need one. Training curves only.", ""]
    else:
        md += [f"Best checkpoint of a trial: the one with the {'lowest' if lower else 'highest'} "
               f"`{select}`.", ""]
        md += _evaluated_sections(sweep, out_dir, numbers)
    md += _curves(sweep, out_dir, numbers, loss_window, eval_window)
    return "\n".join(md) + "\n", numbers


def _evaluated_sections(sweep: Sweep, out_dir: Path, numbers: dict) -> list[str]:
    md: list[str] = []

    # tables: the best checkpoint's and the last one's, one table when they are the same checkpoints
    select, _ = selection_metric(sweep)
    tables = {which: build_table(sweep, which) for which in ("best", "last")}
    same = all([c.steps for c in tables["best"].cells[m]] == [c.steps for c in tables["last"].cells.get(m, [])]
               for m in tables["best"].metrics)
    numbers["tables_identical"] = same
    shown = [("last", f"Results at the last checkpoint (also every trial's best by `{select}`)")] if same else \
        [("best", "Results at the best checkpoint (benchmarks scored only at the end are in the next table)"),
         ("last", "Results at the last checkpoint")]
    for which, title in shown:
        table = tables[which]
        md += [f"## {title}", ""]
        md += _table_md(table, select)
        md += ["", f"Cells: value [{int(LEVEL * 100)}% interval] (across seeds when a configuration has "
               "several; else, for an accuracy, Wilson's interval over its items, for a loss the "
               "evaluator's stderr); **bold**: the column's best; ≈: not distinguishable from it ("
               + _tests_used(table) + ").", ""]
    small = small_groups(sweep.trials)
    if small:
        md += ["Left out: " + ", ".join(f"`{m}` ({n} items)" for m, n in small.items())
               + f": a category of fewer than {MIN_GROUP_ITEMS} items says nothing on its own (its items "
               "count in the benchmark's overall score).", ""]
    numbers["left_out"] = small
    for which, table in tables.items():
        numbers["tables"][which] = [{
            "config": c.values or {"trial": c.trials[0].name},
            "partial": c.running,
            "trainable_params": table.trainable[i],
            "cells": {m: {"value": table.cells[m][i].value, "lo": table.cells[m][i].lo,
                          "hi": table.cells[m][i].hi, "n_seeds": table.cells[m][i].n_seeds,
                          "best": table.cells[m][i].best, "tied": table.cells[m][i].tied,
                          "test": table.cells[m][i].test}
                      for m in table.metrics}} for i, c in enumerate(table.configs)]

    # learning ability
    abilities = learning_ability(sweep)
    md += ["## Learning ability (PLoRA vs LoRA at the same rank)", "", DEFINITION, ""]
    if abilities:
        md += ["| PLoRA | LoRA reference | target | (a) speed n_LoRA/n_PLoRA | (b) best ratio |",
               "|---|---|---|---|---|"]
        for a in abilities:
            speed = a.speed_summary()
            if speed is None:
                speed_text = (f"not reached in {len(a.speed) - a.reached} of {len(a.speed)} "
                              "seed(s): no number")
            else:
                speed_text = _interval(*speed, digits=2) + "×"
            quality = a.quality_summary()
            md.append(f"| {a.plora.label()} | {a.lora.label()} | {a.target} (`{a.metric}`) | "
                      f"{speed_text} | {_interval(*quality, digits=3)} |")
            numbers["learning_ability"].append({
                "plora": a.plora.label(), "lora": a.lora.label(), "metric": a.metric,
                "target": a.target, "speed_per_seed": a.speed,
                "speed": None if speed is None else list(speed),
                "quality_per_seed": a.quality, "quality": list(quality)})
    else:
        md.append("No PLoRA configuration with a LoRA run at the same rank in this sweep.")
    md.append("")

    # PLoRA - LoRA, paired
    diffs = method_differences(sweep)
    numbers["differences"] = []
    if diffs:
        md += ["## PLoRA − LoRA at the last checkpoint, paired", "", PAIRED_DEFINITION, "",
               "| PLoRA | metric | PLoRA − LoRA | seeds (paired by seed) | items (seed-averaged) "
               "| verdict |", "|---|---|---|---|---|---|"]
        for d in diffs:
            verdict = {"plora": "PLoRA better", "lora": "LoRA better",
                       None: "not distinguishable"}[d.better]
            md.append(f"| {d.plora.label()} | `{d.metric}` | {d.diff:+.4f} | "
                      f"{_signed(d.seeds)} (n={d.seeds['n']}) | {_signed(d.items)} "
                      f"(n={d.items['n']}) | {verdict} |")
            numbers["differences"].append({"plora": d.plora.label(), "lora": d.lora.label(),
                                           "metric": d.metric, "diff": d.diff,
                                           "seeds": d.seeds, "items": d.items,
                                           "better": d.better})
        md.append("")

    # full FT vs LoRA, and the gap PLoRA closes (only when the sweep ran full FT and LoRA)
    md += headroom_section(sweep, out_dir, numbers)

    # importance
    imp = param_importances(sweep)
    numbers["importance"] = imp
    scored = ("each completed trial's best checkpoint" if imp.get("budget_step") is None else
              f"each completed trial's best checkpoint up to step {imp['budget_step']}, the last "
              "one every trial reached: the scheduler stopped some early, and no trial is "
              "credited for training longer")
    md += ["## What mattered most", "",
           f"Hyperparameter importance for `{imp['metric']}` ({scored}), from "
           f"{imp['n_trials']} completed trials: Optuna's fANOVA and "
           f"PED-ANOVA on a study rebuilt from the trials' searched values.", ""]
    if imp["warning"]:
        md += [f"**Warning:** {imp['warning']} (minimum {MIN_TRIALS}).", ""]
    if imp["fanova"] or imp["ped_anova"]:
        md += ["| parameter | fANOVA | PED-ANOVA |", "|---|---|---|"]
        for name in imp["fanova"] or imp["ped_anova"]:
            md.append(f"| {name} | {_fmt(imp['fanova'].get(name))} | "
                      f"{_fmt(imp['ped_anova'].get(name))} |")
        if imp.get("fanova_error"):
            md.append(f"\nfANOVA could not run: {imp['fanova_error']}")
        if imp.get("ped_anova_error"):
            md.append(f"\nPED-ANOVA could not run: {imp['ped_anova_error']}")
        if figures.importance_figure(imp, out_dir / "importance.png"):
            md += ["", "![importance](importance.png)"]
            numbers["extra_figures"].append("importance.png")
    md.append("")

    # Pareto
    points, metric = pareto_points(sweep)
    numbers["pareto"] = points
    md += ["## Metric vs training cost", "",
           f"Each trial's best `{metric}` against what it cost to reach it (training samples and "
           "wall time `time/elapsed_s` at that checkpoint); Pareto-optimal trials:", ""]
    front = [p for p in points if p["pareto_samples"] or p["pareto_seconds"]]
    if front:
        md += ["| trial | value | samples | seconds | front |", "|---|---|---|---|---|"]
        for p in front:
            which = "+".join(c for c in ("samples", "seconds") if p[f"pareto_{c}"])
            md.append(f"| {p['trial']}{' (partial)' if p['running'] else ''} | "
                      f"{_fmt(p['value'])} | {_fmt(p['samples'])} | {_fmt(p['seconds'])} | "
                      f"{which} |")
    if figures.pareto_figure(points, metric or "", out_dir / "pareto.png"):
        md += ["", "![pareto](pareto.png)"]
        numbers["extra_figures"].append("pareto.png")
    md.append("")
    return md


def _curves(sweep: Sweep, out_dir: Path, numbers: dict, loss_window: int,
            eval_window: int) -> list[str]:
    md = ["## Curves", ""]
    made = []
    if figures.train_loss_figure(sweep, out_dir / "train_loss.png", loss_window):
        ref = figures.loss_reference(sweep.trials)
        made.append(("train_loss.png", f"training loss, moving average over up to {loss_window} steps"
                     + (f"; middle: difference to {ref.name} (the trials see the same batches)" if ref else "")
                     + "; bottom: unloads"))
    for m in eval_metric_keys(sweep.trials):
        name = "eval_" + m[len("eval/"):].replace("/", "_") + ".png"
        if figures.eval_figure(sweep, m, out_dir / name, eval_window):
            made.append((name, f"{m} per checkpoint, moving average over up to {eval_window} checkpoints"))
    if figures.rank_figure(sweep, out_dir / "accumulated_rank.png"):
        made.append(("accumulated_rank.png", "accumulated update rank per stage vs T·r"))
    for name, caption in made:
        md += [f"![{caption}]({name})", ""]
    numbers["figures"] = [n for n, _ in made]
    return md


def write_report(tracking_uri: str, experiment: str, sweep_run_id: str | None = None,
                 out_dir: str | Path | None = None, loss_window: int = 150,
                 eval_window: int = 10, log_to_mlflow: bool = True) -> Path:
    """Write report.md, report.json and the figures into `out_dir` (default
    `reports/<experiment>`), log them under `report/` of the sweep run, return report.md."""
    sweep = load_sweep(tracking_uri, experiment, sweep_run_id)
    out = Path(out_dir) if out_dir is not None else Path("reports") / experiment
    text, numbers = build_report(sweep, out, loss_window, eval_window)
    path = out / "report.md"
    path.write_text(text)
    (out / "report.json").write_text(json.dumps(numbers, indent=1, default=str))
    if log_to_mlflow and sweep.parent is not None:
        # only what this call wrote: `out` may be a directory that holds other files
        for name in ["report.md", "report.json", *numbers["figures"], *numbers["extra_figures"]]:
            sweep.client.log_artifact(sweep.parent.info.run_id, str(out / name),
                                      artifact_path="report")
    return path
