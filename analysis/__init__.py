"""Reads a sweep back from MLflow and reports it (tables, figures, intervals).

Reads MLflow only (through `mlflow.MlflowClient`); imports nothing from `plora_ray`.
"""
