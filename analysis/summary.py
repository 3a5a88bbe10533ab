"""The sweep's closing table: per configuration the metric with its 95 % interval and the
difference to the best with a paired interval, read back from MLflow.

Repeats of a configuration share ``plora.config_id``; a configuration's value is the mean over
its seeds. Its interval: across seeds (mean ± t·standard error) when it has several, else the
metric's own standard error (``<metric>_stderr``, lm-eval's), or for a mean of 0/1 items (an
accuracy) Wilson's score interval over its items, which stays inside [0, 1] (a mean of accuracies
across seeds is clipped to it too). The difference to the best: across
seeds (Welch) when both have several; else a paired bootstrap over the items both scored (the
trials' ``items/step_*.json`` artifacts, the last checkpoint's). A configuration whose
difference interval includes 0 is *indistinguishable* from the best; when every one is, the
summary says so instead of naming a winner. Stored on the sweep's run as ``summary/summary.md``
and ``summary/summary.json``.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from analysis.labels import config_label
from analysis.results import item_scores
from analysis.stats import (LEVEL, MIN_GROUP_ITEMS, distinguishable, is_proportion, item_interval, mean_stderr,
                            paired_bootstrap, seed_difference, t_quantile)
from analysis.store import client_for, no_progress_bar, retry, sweep_trials

N_BOOT = 2000


def _parse(value: str) -> Any:
    if value == "None":
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def _last_items(client, run_id: str, metric: str, scratch: Path):
    """``({item id: score}, {item id: weight} or None)`` of ``metric`` at the run's last
    checkpoint (``analysis.results.item_scores`` on its items artifact); None without one."""
    files = sorted(a.path for a in client.list_artifacts(run_id, "items") if a.path.endswith(".json"))
    if not files:
        return None
    with no_progress_bar():  # MLflow draws a progress bar per download: a closing table is not the place
        local = retry(client.download_artifacts, run_id, files[-1], str(scratch))
    found = item_scores(json.loads(Path(local).read_text()), metric)
    if found is None:
        return None
    ids, scores, weights = found
    return (dict(zip(ids, scores.tolist())),
            None if weights is None else dict(zip(ids, weights.tolist())))


def _mean_items(per_seed: list) -> tuple[dict, dict | None] | None:
    """Per-item scores averaged over a configuration's seeds (items all seeds scored)."""
    per_seed = [s for s in per_seed if s]
    if not per_seed:
        return None
    ids = set.intersection(*(set(s[0]) for s in per_seed))
    scores = {i: sum(s[0][i] for s in per_seed) / len(per_seed) for i in ids}
    return scores, per_seed[0][1]


def sweep_summary(tracking_uri: str, parent_run_id: str, metric: str, mode: str, level: float = LEVEL,
                  n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The closing table as a dict (what ``summary.json`` holds; ``format_summary`` prints it)."""
    client = client_for(tracking_uri)
    trials = sweep_trials(tracking_uri, parent_run_id, client)
    groups: dict[str, list] = {}
    for t in trials:
        groups.setdefault(t["config_id"] or t["run_id"], []).append(t)
    configs = []
    with tempfile.TemporaryDirectory() as scratch:
        for cid, runs in groups.items():
            values = {k: _parse(v) for k, v in runs[0]["space"].items()}
            done = [r for r in runs if r["status"] == "finished" and metric in r["metrics"]]
            row = {"config_id": cid, "label": config_label(values), "values": values,
                   "trials": [{"run_id": r["run_id"], "name": r["name"], "seed": r["seed"], "status": r["status"],
                               "value": r["metrics"].get(metric)} for r in runs],
                   "seeds": len(done), "value": math.nan, "lo": math.nan, "hi": math.nan}
            xs = [r["metrics"][metric] for r in done]
            row["_xs"] = xs
            per_seed = [_last_items(client, r["run_id"], metric, Path(scratch) / r["run_id"]) for r in done]
            row["_items"] = _mean_items(per_seed)
            # a mean of 0/1 items (an accuracy) stays inside [0, 1]: Wilson's interval for one seed
            proportion = bool(row["_items"]) and all(is_proportion(list(s[0].values())) for s in per_seed if s)
            row["items"] = len(row["_items"][0]) if row["_items"] else None
            if len(xs) >= 2:
                mean, se = mean_stderr(xs)
                half = t_quantile(0.5 + level / 2, len(xs) - 1) * se
                lo, hi = mean - half, mean + half
                if proportion:  # a mean of proportions lies in [0, 1] too
                    lo, hi = max(0.0, lo), min(1.0, hi)
                row.update(value=mean, lo=lo, hi=hi, interval="across seeds")
            elif xs:
                se = done[0]["metrics"].get(f"{metric}_stderr", math.nan)
                items = list(row["_items"][0].values()) if proportion else None
                lo, hi = item_interval(xs[0], se, items, level)
                row.update(value=xs[0], lo=lo, hi=hi,
                           interval=f"Wilson over {len(items)} items" if proportion else "item stderr")
            configs.append(row)
    scored = [c for c in configs if not math.isnan(c["value"])]
    best = (min if mode == "min" else max)(scored, key=lambda c: c["value"]) if scored else None
    for c in configs:
        c.update(diff=math.nan, diff_lo=math.nan, diff_hi=math.nan, diff_method=None, verdict="no result")
        if best is None or math.isnan(c["value"]):
            continue
        if c is best:
            c.update(diff=0.0, verdict="best")
            continue
        if len(c["_xs"]) >= 2 and len(best["_xs"]) >= 2:
            d = seed_difference(c["_xs"], best["_xs"], level)
            c["diff_method"] = f"Welch t across seeds ({len(c['_xs'])} vs {len(best['_xs'])})"
        elif c["_items"] and best["_items"]:
            ids = sorted(set(c["_items"][0]) & set(best["_items"][0]))
            weights = [best["_items"][1][i] for i in ids] if best["_items"][1] else None
            d = paired_bootstrap([c["_items"][0][i] for i in ids], [best["_items"][0][i] for i in ids],
                                 weights=weights, n_boot=n_boot, seed=seed, level=level)
            c["diff_method"] = f"paired bootstrap over {len(ids)} items"
        else:
            c.update(diff=c["value"] - best["value"], verdict="no interval")
            continue
        c.update(diff=d["diff"], diff_lo=d["lo"], diff_hi=d["hi"])
        c["verdict"] = "distinguishable" if distinguishable(d["lo"], d["hi"]) else "indistinguishable"
    for c in configs:
        del c["_xs"], c["_items"]
    others = [c for c in scored if c is not best]
    winner = any(c["verdict"] == "distinguishable" for c in others)
    if best is not None and not winner:
        best["verdict"] = "reference"  # the top value, but not a winner
    sign = 1 if mode == "min" else -1  # best first, configurations without a result last
    configs.sort(key=lambda c: (math.isnan(c["value"]), sign * c["value"] if not math.isnan(c["value"]) else 0))
    if best is None:
        sentence = f"No trial finished with {metric}: nothing to compare."
    elif not others:
        sentence = f"Only one configuration finished with {metric}: nothing to compare it with."
    elif not winner:
        sentence = (f"No configuration is distinguishable from the best at the {level:.0%} level "
                    f"(every difference interval includes 0): this sweep names no winner.")
    else:
        tied = [c["label"] for c in others if c["verdict"] != "distinguishable"]
        sentence = (f"Best: {best['label']} ({metric} {best['value']:.4g}); indistinguishable from it "
                    f"at {level:.0%}: {', '.join(tied) if tied else 'none'}.")
    return {"metric": metric, "mode": mode, "level": level, "best_config_id": best and best["config_id"],
            "winner": winner,
            "sentence": sentence, "configs": configs}


def _num(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4g}"


def format_summary(summary: dict) -> str:
    """The table as Markdown (also what the driver prints last)."""
    m, level = summary["metric"], summary["level"]
    lines = [f"| configuration | seeds | {m} | {level:.0%} interval | Δ to best | {level:.0%} interval of Δ "
             f"| vs best | runs |", "|---|---|---|---|---|---|---|---|"]
    for c in summary["configs"]:
        runs = ", ".join(f"{t['name']} ({t['status']})" for t in c["trials"])
        lines.append(f"| {c['label'] or c['config_id']} | {c['seeds']} | {_num(c['value'])} | "
                     f"[{_num(c['lo'])}, {_num(c['hi'])}] | {_num(c['diff'])} | "
                     f"[{_num(c['diff_lo'])}, {_num(c['diff_hi'])}] | {c['verdict']} | {runs} |")
    methods = sorted({c["diff_method"] for c in summary["configs"] if c["diff_method"]})
    notes = [f"Δ = configuration − best ({summary['mode']} {m}); intervals of Δ: {'; '.join(methods)}."
             ] if methods else []
    few = sorted({c["items"] for c in summary["configs"] if c.get("items") and c["items"] < MIN_GROUP_ITEMS})
    if few:
        notes.append(f"{m} is a mean over only {', '.join(map(str, few))} item(s) here: too few to tell "
                     f"configurations apart (at least {MIN_GROUP_ITEMS} wanted).")
    kinds = sorted({c.get("interval") for c in summary["configs"] if c.get("interval")})
    if any(k.startswith("Wilson") for k in kinds):
        notes.append(f"Intervals of {m}: " + "; ".join(kinds) + " (Wilson: the score interval of a "
                     "proportion, inside [0, 1]).")
    if methods and any("bootstrap" in x for x in methods):
        notes.append("A paired bootstrap covers the sampling of items, not run-to-run variation of one "
                     "seed: set `repeats` to measure that too.")
    return "\n".join([*lines, "", *notes, summary["sentence"]])


def _finite(obj: Any) -> Any:
    """NaN (no value) as null: strict JSON readers refuse NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def log_summary(tracking_uri: str, parent_run_id: str, summary: dict) -> str:
    """Store ``summary/summary.md`` and ``summary/summary.json`` on the sweep's run; returns the
    Markdown."""
    client, text = client_for(tracking_uri), format_summary(summary)
    retry(client.log_text, parent_run_id, f"# Sweep summary\n\n{text}\n", "summary/summary.md")
    clean = json.loads(json.dumps(_finite(summary), default=str))
    retry(client.log_dict, parent_run_id, clean, "summary/summary.json")
    return text
