"""The head's heartbeat task survives any exception: it is logged and the next round runs (issue 11, point 8)."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from sparkd.cluster.head import HeadCoordinator, HeldLease
from sparkd.cluster.peers import Peer, PeerError
from sparkd.config import ClusterConfig, Config, PeerConfig

PEER = Peer(PeerConfig(name="b", url="https://b:8443", key_file="/k", address="10.0.0.2"), key="sk-peer-0123456789abcdef")


class ScriptedPeer:
    """Stands in for the network: each heartbeat raises the next scripted exception, then answers."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def call(self, peer: Peer, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {"id": "lease-1"}


def coordinator(client: ScriptedPeer, lost: list[str], lease_timeout_s: float = 30.0) -> HeadCoordinator:
    config = Config(cluster=ClusterConfig(address="10.0.0.1", heartbeat_s=0.01, lease_timeout_s=lease_timeout_s))
    head = HeadCoordinator(config, {"b": PEER}, client, lambda model, reason: lost.append(reason))  # type: ignore[arg-type]
    head._held["m"] = [HeldLease(PEER, "lease-1")]
    return head


async def test_the_heartbeat_outlives_unexpected_exceptions():
    client = ScriptedPeer([RuntimeError("a bug"), KeyError("x"), ValueError("bad json"), PeerError("peer b is unreachable")])
    lost: list[str] = []
    head = coordinator(client, lost)
    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(head._heartbeat("m"))
        while client.calls < 8:
            await asyncio.sleep(0.01)
        assert not task.done()  # still beating after four failures of four kinds
        task.cancel()
    failed = [entry for entry in logs if entry["event"] == "worker_heartbeat_failed"]
    assert [entry["log_level"] for entry in failed] == ["error", "error", "error", "warning"]
    assert all(entry["peer"] == "b" for entry in failed)
    assert sum(1 for entry in failed if entry.get("exc_info")) == 3  # the unexpected ones carry their traceback
    assert lost == []


async def test_a_crashing_round_is_logged_and_the_next_one_runs(monkeypatch):
    client = ScriptedPeer([])
    lost: list[str] = []
    head = coordinator(client, lost)
    rounds = 0
    original = head._heartbeat_round

    async def flaky_round(model: str) -> str | None:
        nonlocal rounds
        rounds += 1
        if rounds <= 2:
            raise RuntimeError("a bug outside any one peer call")
        return await original(model)

    monkeypatch.setattr(head, "_heartbeat_round", flaky_round)
    with capture_logs() as logs:
        task = asyncio.get_running_loop().create_task(head._heartbeat("m"))
        while client.calls < 2:
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
    assert [entry["event"] for entry in logs].count("worker_heartbeat_crashed") == 2


async def test_a_lease_silent_past_its_timeout_is_lost_even_when_every_failure_is_unexpected():
    client = ScriptedPeer([RuntimeError("a bug")] * 1000)
    lost: list[str] = []
    head = coordinator(client, lost, lease_timeout_s=0.05)
    with capture_logs():
        await asyncio.wait_for(head._heartbeat("m"), 5)
    assert len(lost) == 1 and "peer b has not answered heartbeats" in lost[0]
