"""The .deb under real systemd: install, start, serve, log, reload, watchdog, stop, purge.

One Debian machine (a container with systemd as PID 1, see conftest.py) goes
through a sparkd's life in order; the tests below are its steps and share it,
so they run in file order. Each prints how long its step took.

The configuration is laid down before the package is installed (dpkg keeps it:
--force-confold), as an administrator pre-seeding a machine would: it listens
on a free port of the shared network and names its own instance, so nothing
else on the host's Podman is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from typing import Any

import aiohttp
import pytest

from harness import REPO, free_port, to_toml

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

MODEL = "e2e-echo"
INSTANCE = "e2e" + uuid.uuid4().hex[:8]
PORT = free_port()
ENGINE_PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
# A stream of 40 tokens at 10 tokens/s: 4 s, long enough to stop sparkd during it.
STREAM_TOKENS = 40
CATALOG = sorted(path.name for path in (REPO / "etc" / "models.d").glob("*.toml"))


def config(engine_image: str, **model_overrides: Any) -> str:
    model = {
        "image": engine_image,
        "gpu": False,
        "gpu_memory": 0.1,
        # Its own host port: other sparkd daemons (tests) on this host pick from the default range.
        "port": ENGINE_PORT,
        "args": ["--port", "8000", "--served-model-name", MODEL],
        "env": {"FAKE_TOKEN_RATE": "10", "FAKE_TOKENS": str(STREAM_TOKENS)},
        **model_overrides,
    }
    document = {
        "server": {"listen": [f"127.0.0.1:{PORT}"], "instance": INSTANCE, "shutdown_grace_s": 30},
        "gpu": {"devices": []},
        "defaults": {"shm_size": "64m", "ulimits": {}},
        "lifecycle": {"min_uptime_s": 0, "failure_backoff_s": 0},
        # No engine-cache mounts: this machine shares the host's Podman, which would look for
        # their source directories on the host, not in this machine's /var/lib/sparkd.
        "engine_cache": {"paths": []},
        "models": {MODEL: model},
    }
    return "# sparkd end-to-end test configuration\n" + to_toml(document)


def container_name() -> str:
    return f"sparkd-{INSTANCE}-{MODEL}"


class Timer:
    def __init__(self, step: str) -> None:
        self.step = step
        self.started = time.monotonic()

    def __enter__(self) -> Timer:
        return self

    def __exit__(self, *exc: Any) -> None:
        print(f"e2e step {self.step}: {time.monotonic() - self.started:.1f}s")


@pytest.fixture(scope="module")
def installed(machine: Any, deb_path: Any, engine_image: str, podman: Any) -> Any:
    """sparkd installed with `apt install ./sparkd_*.deb` over a pre-seeded configuration."""
    machine.write("/etc/sparkd/sparkd.toml", config(engine_image))
    # The shipped catalog's drop-ins, pre-seeded empty: this machine shares the
    # host's Podman, where the catalog's utility model must not start. (The
    # catalog itself is exercised by test_install_script.py on its own Podman.)
    for dropin in CATALOG:
        machine.write(f"/etc/sparkd/models.d/{dropin}", "# pre-seeded empty by the end-to-end test\n")
    subprocess_copy(machine, deb_path)
    with Timer("apt install"):
        result = machine.sh(
            f"cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confold ./{deb_path.name}",
            timeout=300,
        )
    machine.apt_output = result.stdout + result.stderr
    yield machine
    remove_containers_of_instance(podman)


def subprocess_copy(machine: Any, deb_path: Any) -> None:
    import subprocess

    proc = subprocess.run(["podman", "cp", str(deb_path), f"{machine.name}:/root/{deb_path.name}"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def remove_containers_of_instance(podman: Any) -> None:
    for container in podman.containers.list(all=True, filters={"label": f"io.sparkd.instance={INSTANCE}"}):
        with contextlib.suppress(Exception):  # best-effort cleanup
            container.remove(force=True)


def client_key(machine: Any) -> str:
    text = machine.out("cat /etc/sparkd/keys.toml")
    match = re.search(r'\[keys\.user\]\s*\nkey = "([^"]+)"', text)
    assert match, text
    return match.group(1)


def headers(machine: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {client_key(machine)}"}


async def chat(machine: Any, text: str = "hello from systemd", **fields: Any) -> tuple[int, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 3, **fields}
    async with aiohttp.ClientSession(headers=headers(machine)) as session:
        async with session.post(BASE + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as response:
            return response.status, await response.json(content_type=None)


async def get(path: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(BASE + path, timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- steps


def test_install_creates_user_keys_and_starts_the_service(installed: Any) -> None:
    machine = installed
    assert "client keys were written to /etc/sparkd/keys.toml" in machine.apt_output, machine.apt_output
    assert machine.out("systemctl is-enabled sparkd") == "enabled"
    wait_until(lambda: machine.out("systemctl is-active sparkd || true") == "active", 60, "sparkd to be active after install")
    # The service user, and the keys only it (and root) can read.
    assert machine.out("getent passwd sparkd | cut -d: -f7") in ("/usr/sbin/nologin", "/sbin/nologin")
    assert machine.out("stat -c '%U:%G %a' /etc/sparkd/keys.toml") == "sparkd:sparkd 600"
    keys = machine.out("cat /etc/sparkd/keys.toml")
    assert len(set(re.findall(r'key = "(sk-sparkd-[0-9a-f]{64})"', keys))) == 2, keys
    pid = machine.show("MainPID")["MainPID"]
    assert machine.out(f"ps -o user= -p {pid}") == "sparkd"
    # The Podman socket: the sparkd group may connect, others may not.
    assert machine.out("stat -c '%G %a' /run/podman/podman.sock") == "sparkd 660"
    denied = machine.sh("setpriv --reuid=nobody --regid=nogroup --clear-groups curl -s --max-time 5 --unix-socket /run/podman/podman.sock http://d/_ping", check=False)
    assert denied.returncode != 0 and denied.stdout != "OK"
    # Our pre-seeded configuration was kept; the shipped one is beside it and valid.
    assert "end-to-end test configuration" in machine.out("cat /etc/sparkd/sparkd.toml")
    # The shipped configuration and catalog (kept beside ours as .dpkg-dist) are valid.
    shipped = " && ".join(
        ["cp /etc/sparkd/sparkd.toml.dpkg-dist /root/shipped/sparkd.toml"]
        + [f"cp /etc/sparkd/models.d/{name}.dpkg-dist /root/shipped/models.d/{name}" for name in CATALOG]
    )
    machine.sh(f"mkdir -p /root/shipped/models.d && {shipped}")
    print(machine.out("sparkd check-config --config /root/shipped/sparkd.toml"))
    assert machine.out("curl -s -o /dev/null -w '%{http_code}' " + BASE + "/readyz") == "200"
    assert "failed:" not in machine.show("StatusText")["StatusText"]
    for script in ("sparkd",):
        assert machine.out(f"readlink -f /usr/bin/{script}") == f"/opt/venvs/sparkd/bin/{script}"


def test_systemctl_start_returns_once_ready(installed: Any) -> None:
    machine = installed
    machine.sh("systemctl stop sparkd")
    with Timer("systemctl start"):
        machine.sh("systemctl start sparkd")
    # Right when `systemctl start` returns (no retry): ready and serving.
    state = machine.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["StatusText"].startswith("ready: "), state
    assert asyncio.run(get("/readyz")) == 200
    assert asyncio.run(get("/healthz")) == 200
    assert (state["Type"], state["NotifyAccess"]) == ("notify", "main")
    print(f"e2e: {state}")


def test_chat_through_the_service_and_journal_priorities(installed: Any, podman: Any) -> None:
    machine = installed
    with Timer("first chat (cold start of the model container)"):
        status, body = asyncio.run(chat(machine))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].startswith("hello from systemd")
    assert machine.show("StatusText")["StatusText"].startswith(f"ready: {MODEL}")
    assert podman.containers.get(container_name()).status == "running"

    info = machine.journal("-p info -o cat")
    assert re.search(rf"event=model_ready model={MODEL}", info), info[-3000:]
    warnings = machine.journal("-p warning -o cat")
    assert "model_ready" not in warnings and "level=info" not in warnings, warnings[-3000:]
    # journald recorded each line's level as its priority (no prefix left in MESSAGE).
    entries = [json.loads(line) for line in machine.journal("-o json").splitlines() if line.startswith("{")]
    ready = [e for e in entries if "event=model_ready" in e.get("MESSAGE", "")]
    assert ready and all(e["PRIORITY"] == "6" and not e["MESSAGE"].startswith("<") for e in ready), ready
    assert all(e.get("SYSLOG_IDENTIFIER") == "sparkd" for e in ready)


def test_reload_with_a_broken_config_keeps_serving(installed: Any, engine_image: str) -> None:
    machine = installed
    good = machine.out("cat /etc/sparkd/sparkd.toml") + "\n"
    broken = good.replace("gpu_memory = 0.1", 'gpu_memory = "lots"')
    assert broken != good
    machine.write("/etc/sparkd/sparkd.toml", broken)
    since = machine.out("date '+%Y-%m-%d %H:%M:%S'")
    machine.sh("systemctl reload sparkd")
    problem = wait_until(
        lambda: [line for line in machine.journal(f"--since '{since}' -p err -o cat").splitlines() if "config_problem" in line],
        15,
        "the journal to report the broken key",
    )
    assert any(f"models.{MODEL}.gpu_memory" in line for line in problem), problem
    assert any("reload_rejected" in line for line in machine.journal(f"--since '{since}' -p err -o cat").splitlines())
    state = machine.show("ActiveState", "StatusText")
    assert state["ActiveState"] == "active" and "reload failed" in state["StatusText"], state
    status, body = asyncio.run(chat(machine, "still serving"))
    assert status == 200, body

    machine.write("/etc/sparkd/sparkd.toml", good)
    machine.sh("systemctl reload sparkd")
    wait_until(lambda: "reload failed" not in machine.show("StatusText")["StatusText"], 15, "STATUS to drop the reload failure")


def test_watchdog_restarts_a_stopped_sparkd(installed: Any) -> None:
    machine = installed
    machine.write("/etc/systemd/system/sparkd.service.d/e2e-watchdog.conf", "[Service]\nWatchdogSec=3\nRestartSec=1\n")
    machine.sh("systemctl daemon-reload && systemctl restart sparkd")
    before = machine.show("MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] in ("3s", "3000000"), before
    assert asyncio.run(chat(machine))[0] == 200  # a loaded model, for the restarted daemon to adopt
    with Timer("watchdog restart"):
        machine.sh(f"kill -STOP {before['MainPID']}")
        after = wait_until(
            lambda: (lambda s: s if s["MainPID"] not in ("0", before["MainPID"]) and s["ActiveState"] == "active" and s["SubState"] == "running" else None)(
                machine.show("MainPID", "NRestarts", "ActiveState", "SubState", "Result")
            ),
            60,
            "systemd to restart the stopped sparkd",
        )
    assert int(after["NRestarts"]) > int(before["NRestarts"]), (before, after)
    assert "watchdog timeout" in machine.out("journalctl --no-pager -u sparkd -o cat | grep -i watchdog || true").lower()
    # The restarted daemon adopted the running model: no cold start.
    assert machine.show("StatusText")["StatusText"].startswith(f"ready: {MODEL}")
    machine.sh("rm -r /etc/systemd/system/sparkd.service.d && systemctl daemon-reload && systemctl restart sparkd")


def test_stop_lets_the_in_flight_stream_finish_and_stops_the_model(installed: Any, podman: Any) -> None:
    machine = installed
    assert asyncio.run(chat(machine))[0] == 200  # the model is loaded
    stop_result: dict[str, Any] = {}

    def stop() -> None:
        started = time.monotonic()
        stop_result["proc"] = machine.sh("systemctl stop sparkd", check=False, timeout=180)
        stop_result["seconds"] = time.monotonic() - started
        stop_result["at"] = time.monotonic()

    async def stream_and_stop() -> tuple[list[str], float, threading.Thread]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "stream": True, "max_tokens": STREAM_TOKENS}
        chunks: list[str] = []
        stopper = threading.Thread(target=stop)
        async with aiohttp.ClientSession(headers=headers(machine)) as session:
            async with session.post(BASE + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as response:
                assert response.status == 200
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    chunks.append(line[5:].strip())
                    if len(chunks) == 3:
                        stopper.start()  # sparkd gets SIGTERM mid-stream
        return chunks, time.monotonic(), stopper

    with Timer("systemctl stop during a stream"):
        chunks, finished_at, stopper = asyncio.run(stream_and_stop())
        stopper.join(180)
    assert chunks and chunks[-1] == "[DONE]", chunks[-3:]
    finishes = [json.loads(c)["choices"][0].get("finish_reason") for c in chunks[:-1] if json.loads(c).get("choices")]
    assert "length" in finishes or "stop" in finishes, chunks[-3:]
    assert stop_result["proc"].returncode == 0, stop_result["proc"].stderr
    assert finished_at <= stop_result["at"], "systemctl stop returned before the stream ended"
    assert machine.out("systemctl is-active sparkd || true") == "inactive"
    journal = machine.journal("-o cat -n 60")
    assert "sparkd_stopping" in journal and "sparkd_stopped" in journal, journal[-2000:]
    # on_shutdown = stop (the default): the model container is stopped, the GPU freed.
    container = podman.containers.get(container_name())
    container.reload()
    assert container.status in ("exited", "stopped"), container.status
    print(f"e2e: stop took {stop_result['seconds']:.1f}s with a {STREAM_TOKENS}-token stream in flight")


def test_security_exposure(installed: Any) -> None:
    machine = installed
    machine.sh("systemctl start sparkd")
    report = machine.out("systemd-analyze security --no-pager sparkd.service")
    match = re.search(r"Overall exposure level for sparkd\.service: ([0-9.]+)", report)
    assert match, report
    score = float(match.group(1))
    print("\n".join(line for line in report.splitlines() if line.startswith("✗")))
    print(f"RESULT systemd_exposure {score}")
    # A regression guard, not a target: dropping hardening directives raises it.
    assert score <= 2.0, report


def test_remove_then_purge_leave_nothing_behind(installed: Any, podman: Any) -> None:
    machine = installed
    with Timer("apt remove"):
        machine.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y sparkd", timeout=300)
    assert machine.out("systemctl is-active sparkd || true") in ("inactive", "unknown")
    assert machine.sh("test -e /lib/systemd/system/sparkd.service || test -e /usr/lib/systemd/system/sparkd.service", check=False).returncode != 0
    assert machine.sh("test -e /usr/bin/sparkd || test -e /opt/venvs/sparkd", check=False).returncode != 0
    # remove keeps the configuration (and the keys) for a reinstall ...
    assert machine.sh("test -f /etc/sparkd/sparkd.toml && test -f /etc/sparkd/keys.toml", check=False).returncode == 0
    # ... but hands the Podman socket back to root.
    assert machine.out("stat -c '%G' /run/podman/podman.sock /run/podman") == "root\nroot"

    with Timer("apt purge"):
        machine.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y sparkd", timeout=300)
    leftovers = machine.out(
        "for p in /etc/sparkd /var/lib/sparkd /run/sparkd /opt/venvs/sparkd /usr/bin/sparkd "
        "/lib/systemd/system/sparkd.service /usr/lib/systemd/system/sparkd.service "
        "/etc/systemd/system/multi-user.target.wants/sparkd.service /etc/systemd/system/sparkd.service.d "
        "/usr/lib/systemd/system/podman.socket.d/50-sparkd.conf; do [ -e $p ] && echo $p; done; true"
    )
    assert leftovers == "", leftovers
    assert machine.sh("getent passwd sparkd", check=False).returncode != 0, "the sparkd user is still there"
    assert machine.sh("getent group sparkd", check=False).returncode != 0, "the sparkd group is still there"
    assert "sparkd" not in machine.out("systemctl list-unit-files --no-legend 'sparkd*' || true")
    assert machine.out("dpkg -l sparkd 2>/dev/null | tail -1 | cut -c1-2 || true") in ("", "un")
