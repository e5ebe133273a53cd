"""Optuna studies with MLflow tracking (issue 5)."""
