"""Reads a sweep back from MLflow and reports it (tables, figures, intervals).

Reads MLflow only (through `mlflow.MlflowClient`); imports nothing from `plora_ray`.
"""

from .report import write_report  # noqa: E402  (light: matplotlib, mlflow, optuna load lazily)

__all__ = ["write_report"]
