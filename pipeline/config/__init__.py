"""Typed configuration: schema, loading, validation and Hydra composition."""

from pipeline.config.loading import ConfigError, compose, config_digest, flatten, load_config, validate
from pipeline.config.schema import PipelineConfig, TaskConfig

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "TaskConfig",
    "compose",
    "config_digest",
    "flatten",
    "load_config",
    "validate",
]
