"""What sparkd knows of a container, and what it needs of the runtime that runs them.

The protocols are the seam between the scheduler and Podman: ``PodmanRuntime``
implements them, and a test fake that stands in for it implements them too, so
mypy checks both against the same signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .spec import ContainerSpec


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    id: str
    model: str | None
    spec_hash: str | None
    status: str
    """Podman's state word: created, running, exited, stopping, ..."""
    started_at: float | None
    host_port: int | None
    engine_key: str | None = field(repr=False)
    exit_code: int | None
    pid: int | None = None
    """The host PID of the container's first process while it runs (its cgroup holds the rest)."""

    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")


class ContainerLookup(Protocol):
    """What scheduling and adoption after a restart need: find the managed containers, stop one."""

    async def inspect(self, name: str) -> ContainerInfo | None:
        """The container's state, or None when there is no such container."""
        ...

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container this sparkd instance manages, running or not."""
        ...

    async def stop(self, name: str, timeout: float) -> ContainerInfo | None:
        """Stop ``name`` (SIGTERM, then SIGKILL after ``timeout``) and return its final state."""
        ...


class ContainerRuntime(ContainerLookup, Protocol):
    """Everything the daemon, the lifecycle and the operator API do with containers."""

    url: str
    """The runtime's API address (for the threads that follow logs and events)."""

    async def ping(self) -> None: ...

    async def version(self) -> str: ...

    async def tail_logs(self, name: str, lines: int = 20) -> list[str]: ...

    async def ensure(self, spec: ContainerSpec, port_range: tuple[int, int]) -> ContainerInfo:
        """The model's container, created (or re-created when its spec changed) if needed."""
        ...

    async def start(self, name: str, image: str = "") -> None: ...

    async def remove(self, name: str) -> None: ...

    def close(self) -> None: ...
