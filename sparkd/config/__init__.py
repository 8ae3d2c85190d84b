"""Configuration: schema (typed dataclasses), loading, validation."""

from .load import DEFAULT_PATH, load_config
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
from .values import parse_listen

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
