"""Tracking: MLflow runs, lineage tags and the model registry."""
