"""Issue 15 point 3: a start-up that fails half-way releases everything it acquired.

Start-up registers each release on an ``AsyncExitStack`` right after acquiring the
resource, so a ``StartupError`` raised after the GPU lock is taken leaves no lock,
no listening socket, no open database and no worker thread behind. These failures
come before sparkd first calls Podman, so no Podman is needed here.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from sparkd.config import load_config
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
    """The usage history cannot be opened: the lock, Podman client, engine session and sampler thread go."""
    port = free_port()
    daemon = daemon_for(tmp_path, [f"127.0.0.1:{port}"])
    (tmp_path / "state" / "history.sqlite3").mkdir(parents=True)  # a directory where the database should be
    with pytest.raises(StartupError, match="usage history .* cannot be used"):
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
