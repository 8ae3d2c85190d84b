"""Issue 15 point 3: a start-up that fails half-way releases everything it acquired.

Start-up registers each release on an ``AsyncExitStack`` right after acquiring the
resource, so a ``StartupError`` raised after the GPU lock is taken leaves no lock,
no listening socket, no open database and no worker thread behind. These failures
come before sparkd first calls Podman, so no Podman is needed here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from harness import write_keys
from sparkd.config import Config, load_config
from sparkd.daemon import Daemon, StartupError
from sparkd.lock import GpuLock


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def daemon_for(tmp_path: Path, listen: list[str]) -> Daemon:
    path = tmp_path / "sparkd.toml"
    addresses = ", ".join(f'"{address}"' for address in listen)
    path.write_text(
        f'[server]\nlisten = [{addresses}]\nanonymous = "loopback"\nkeys_file = "{tmp_path}/keys.toml"\n'
        f'state_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        f'[podman]\nurl = "unix://{tmp_path}/no-podman.sock"\n'
        '[gpu]\nmemory_probe = "none"\n'
    )
    return Daemon(load_config(path), path)


def open_files_under(directory: Path) -> list[str]:
    """The files of this process's open descriptors that lie under ``directory``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor)
        if target.startswith(str(directory)):
            found.append(target)
    return found


def assert_released(tmp_path: Path, ports: list[int]) -> None:
    lock = GpuLock(tmp_path / "run" / "gpu.lock")
    lock.acquire()  # raises LockHeld while the failed start-up still holds it
    lock.release()
    for port in ports:
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))  # the listener bound before the failure is closed
    assert open_files_under(tmp_path) == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("sparkd-")]


async def test_a_failure_after_the_lock_releases_the_lock_and_everything_after_it(tmp_path: Path):
    """The usage history cannot be opened: the lock, the Podman client, the engine session and the sampler thread go."""
    port = free_port()
    daemon = daemon_for(tmp_path, [f"127.0.0.1:{port}"])
    (tmp_path / "state" / "history.sqlite3").mkdir(parents=True)  # a directory where the database should be
    with pytest.raises(StartupError, match=r"usage history .* cannot be used"):
        await daemon.run()
    assert (tmp_path / "run" / "gpu.lock").exists()  # it was taken before the failure
    assert_released(tmp_path, [port])


async def test_a_port_in_use_releases_the_listeners_already_bound_the_history_and_the_lock(tmp_path: Path):
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        daemon = daemon_for(tmp_path, [f"127.0.0.1:{first}", f"127.0.0.1:{busy}"])
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{busy}"):
            await daemon.run()
    assert (tmp_path / "state" / "history.sqlite3").exists()  # opened before the failure
    assert_released(tmp_path, [first])


class AppliedConfigs:
    """Stands in for the scheduler on a reload: what ``status_line`` reads, and the configurations it was given."""

    def __init__(self) -> None:
        self.runners: dict[str, object] = {}
        self.queue: list[object] = []
        self.gpu_missing: str | None = None
        self.applied: list[Config] = []

    def apply_config(self, config: Config) -> None:
        self.applied.append(config)


async def test_a_reload_swaps_one_frozen_snapshot_and_a_refused_one_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    alice = "sk-alice-" + "a" * 32
    keys = tmp_path / "keys.toml"
    daemon = daemon_for(tmp_path, ["127.0.0.1:18009"])
    before = daemon.snapshot.current
    write_keys(keys, {"alice": {"key": alice}})
    config = tmp_path / "sparkd.toml"
    config.write_text(config.read_text() + '[models.m]\nimage = "i"\ngpu = false\naliases = ["em"]\n')
    scheduler = AppliedConfigs()
    assert await daemon.reload(scheduler)  # type: ignore[arg-type]
    after = daemon.snapshot.current
    # One new value for the configuration, the model directory, the keys and the compiled fixups together.
    assert after is not before and scheduler.applied == [after.config]
    assert after.directory.resolve("em").name == "m" and after.fixups_of(after.config.models["m"]) is not None
    assert after.keys.check(alice) is not None and before.keys.check(alice) is None
    assert "m" not in before.config.models and before.directory.lookup("m") is None  # the old snapshot is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.keys = before.keys  # type: ignore[misc]

    config.write_text(config.read_text() + "[lifecycle]\nqueue_size = 0\n")
    with capture_logs() as logged:
        assert not await daemon.reload(scheduler)  # type: ignore[arg-type]
    assert [e["key"] for e in logged if e["event"] == "config_problem"] == ["lifecycle.queue_size"]
    keys.chmod(0o644)
    config.write_text(config.read_text().replace("[lifecycle]\nqueue_size = 0\n", ""))
    with capture_logs() as logged:
        assert not await daemon.reload(scheduler)  # type: ignore[arg-type]
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["keys_problem", "reload_rejected"]
    assert daemon.snapshot.current is after and len(scheduler.applied) == 1
