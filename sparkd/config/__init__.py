"""Configuration: schema (typed dataclasses), loading, validation."""

from .load import DEFAULT_PATH, load_config, parse_listen
from .schema import Config, ContainerDefaults, GpuConfig, LifecycleConfig, LogConfig, ModelConfig, PodmanConfig, ServerConfig
from .validate import ConfigError, Problem

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "ConfigError",
    "ContainerDefaults",
    "GpuConfig",
    "LifecycleConfig",
    "LogConfig",
    "ModelConfig",
    "PodmanConfig",
    "Problem",
    "ServerConfig",
    "load_config",
    "parse_listen",
]
