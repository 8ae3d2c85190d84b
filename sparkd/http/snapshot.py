"""What a reload replaces, as one frozen value: the configuration and everything derived from it.

A reload builds a new ``Snapshot`` and swaps it in with one assignment
(``SnapshotHolder.current``); a request reads ``current`` once and works with that
snapshot to its end, so it never sees the models of one configuration and the keys
or fixups of another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Config, ModelConfig
from ..fixups import DEFAULT_PROFILE, Fixups, compile_profile
from .auth import KeyRing
from .routing import ModelDirectory


@dataclass(frozen=True)
class Snapshot:
    config: Config
    directory: ModelDirectory
    keys: KeyRing
    fixups: Mapping[str, Fixups]
    """Each model's compiled profile, by model name."""

    @classmethod
    def of(cls, config: Config, keys: KeyRing) -> Snapshot:
        fixups = {
            name: compile_profile(config.profiles[model.profile or DEFAULT_PROFILE], model.tools)
            for name, model in config.models.items()
        }
        return cls(config, ModelDirectory(config), keys, fixups)

    def fixups_of(self, model: ModelConfig) -> Fixups:
        return self.fixups[model.name]


class SnapshotHolder:
    """The snapshot in force; the daemon's reload is its only writer."""

    def __init__(self, current: Snapshot) -> None:
        self.current = current
