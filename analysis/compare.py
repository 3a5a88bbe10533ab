"""Two runs side by side, metric by metric, with paired intervals.

    python -m analysis compare RUN_A RUN_B [--tracking-uri URI] [--checkpoint best|last]
"""

from __future__ import annotations

import math

from analysis import stats
from analysis.results import checkpoint_step, eval_metric_keys, paired_items
from analysis.stats import LEVEL
from analysis.store import Trial, client_for, load_run, lower_is_better


def _selection(trial: Trial, keys: list[str]) -> tuple[str | None, bool]:
    parent_id = trial.tags.get("mlflow.parentRunId")
    if parent_id:
        tags = trial.client.get_run(parent_id).data.tags
        if tags.get("plora.metric") in keys:
            return tags["plora.metric"], tags.get("plora.mode", "min") == "min"
    if "eval/heldout/loss" in keys:
        return "eval/heldout/loss", True
    return (keys[0], lower_is_better(keys[0])) if keys else (None, True)


def compare_runs(tracking_uri: str, run_a: str, run_b: str, which: str = "best") -> dict:
    client = client_for(tracking_uri)
    a, b = load_run(tracking_uri, run_a, client), load_run(tracking_uri, run_b, client)
    keys = [k for k in eval_metric_keys([a]) if k in set(eval_metric_keys([b]))]
    select, lower = _selection(a, keys)
    step_a = checkpoint_step(a, select, lower, which) if select else None
    step_b = checkpoint_step(b, select, lower, which) if select else None
    rows = []
    for key in keys:
        va, vb = a.value_at(key, step_a), b.value_at(key, step_b)
        row = {"metric": key, "a": va, "b": vb, "diff": va - vb,
               "lo": math.nan, "hi": math.nan, "test": "none"}
        paired = paired_items(a, step_a, b, step_b, key) if step_a and step_b else None
        if paired is not None:
            res = stats.paired_bootstrap(*paired[:2], weights=paired[2], level=LEVEL)
            row.update(lo=res["lo"], hi=res["hi"], test=f"paired ({res['n']} items)")
        else:
            se = math.hypot(a.value_at(key + "_stderr", step_a), b.value_at(key + "_stderr", step_b))
            if not math.isnan(se):
                row["lo"], row["hi"] = stats.normal_interval(row["diff"], se, LEVEL)
                row["test"] = "unpaired normal"
        row["distinguishable"] = stats.distinguishable(row["lo"], row["hi"])
        row["better"] = ("—" if not row["distinguishable"] else
                         ("A" if (row["diff"] < 0) == lower_is_better(key) else "B"))
        rows.append(row)
    return {"a": a, "b": b, "step_a": step_a, "step_b": step_b, "selection": select,
            "which": which, "rows": rows}


def format_comparison(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A = {a.name} ({a.run_id}), {result['which']} checkpoint: step {result['step_a']}",
             f"B = {b.name} ({b.run_id}), {result['which']} checkpoint: step {result['step_b']}"
             f" (chosen by {result['selection']})", "",
             f"| metric | A | B | A − B [{int(LEVEL * 100)}% interval] | interval | better |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        interval = ("" if math.isnan(r["lo"]) else f" [{r['lo']:.4f}, {r['hi']:.4f}]")
        lines.append(f"| {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f}{interval}"
                     f" | {r['test']} | {r['better']} |")
    if not result["rows"]:
        lines.append("| (no eval metric common to both runs) | | | | | |")
    return "\n".join(lines) + "\n"
