"""Configuration: schema (typed dataclasses), loading, validation."""

from .load import DEFAULT_PATH, load_config, parse_listen
from .schema import (
    ClusterConfig,
    Config,
    ContainerDefaults,
    EngineConfig,
    GpuConfig,
    LifecycleConfig,
    LogConfig,
    ModelConfig,
    PeerConfig,
    PodmanConfig,
    ServerConfig,
)
from .validate import ConfigError, Problem

__all__ = [
    "DEFAULT_PATH",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ContainerDefaults",
    "EngineConfig",
    "GpuConfig",
    "LifecycleConfig",
    "LogConfig",
    "ModelConfig",
    "PeerConfig",
    "PodmanConfig",
    "Problem",
    "ServerConfig",
    "load_config",
    "parse_listen",
]
