"""Reads a sweep back from MLflow and reports it (tables, figures, intervals).

Reads MLflow only (through `mlflow.MlflowClient`, layout in docs/tracking_layout.md); imports
nothing from `plora_ray`.

    python -m analysis report --experiment NAME [--sweep RUN_ID] [--tracking-uri URI] [--out DIR]
    python -m analysis compare RUN_A RUN_B [--tracking-uri URI] [--checkpoint best|last]

Modules: `stats` (intervals, paired bootstrap), `store` (reading runs), `results` (checkpoints,
configurations, table cells and ties), `learning` (PLoRA vs LoRA learning ability),
`importance` (fANOVA / PED-ANOVA), `figures`, `report` (`write_report`), `compare`.
"""

from analysis.report import write_report  # noqa: E402  (light: matplotlib, mlflow, optuna load lazily)

__all__ = ["write_report"]
