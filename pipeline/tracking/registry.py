"""The model registry: every export becomes a version aliased `challenger`; `champion` moves
only when the configured metric beats the current champion's."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config.schema import RegistryConfig

CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass
class Registration:
    name: str
    version: str
    metric: float
    promoted: bool
    previous_champion: str | None
    previous_metric: float | None


def is_better(new: float, old: float | None, greater_is_better: bool) -> bool:
    if old is None:
        return True
    return new > old if greater_is_better else new < old


def champion(client: MlflowClient, name: str) -> tuple[str, float | None] | None:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = mv.tags.get("metric_value")
    return str(mv.version), float(value) if value is not None else None


def register(model_uri: str, run_id: str, cfg: RegistryConfig, metric_value: float,
             tags: dict[str, str]) -> Registration:
    """Register `model_uri`, alias it challenger, and promote it to champion if it is better."""
    import mlflow

    client = MlflowClient()
    mv = mlflow.register_model(model_uri, cfg.name, tags={**tags, "metric_name": cfg.metric,
                                                          "metric_value": str(metric_value), "run_id": run_id})
    client.set_registered_model_alias(cfg.name, CHALLENGER, mv.version)
    current = champion(client, cfg.name)
    prev_version, prev_value = current if current else (None, None)
    promoted = is_better(metric_value, prev_value, cfg.greater_is_better)
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION, mv.version)
    return Registration(cfg.name, str(mv.version), metric_value, promoted, prev_version, prev_value)
