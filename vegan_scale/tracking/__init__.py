"""Tracking in MLflow: the run of a run directory (mlflow_run) and the main process's background tracker (tracker)."""
