"""A container runtime without containers, for the scheduling unit tests.

It subclasses the protocol the scheduler and the adoption after a restart use
(``ContainerLookup``), so mypy checks it against the same signatures as
``PodmanRuntime`` (tests/run-all.sh type-checks this file with sparkd/).
"""

from __future__ import annotations

from typing import final

from sparkd.runtime.containers import ContainerInfo, ContainerLookup


@final  # mypy reports a final class that leaves a protocol member out
class FakeRuntime(ContainerLookup):
    """No container exists; stopping one is a no-op."""

    async def inspect(self, name: str) -> ContainerInfo | None:
        return None

    async def list_managed(self) -> list[ContainerInfo]:
        return []

    async def stop(self, name: str, timeout: float) -> ContainerInfo | None:
        return None
