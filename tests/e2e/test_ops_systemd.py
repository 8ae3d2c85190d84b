"""sparkctl, history and metrics of the installed .deb under real systemd (issue 7).

Its own machine (the fixtures of test_systemd_deb.py): the admin socket the
hardened unit creates, who may use it (root and the sparkd group, nobody else),
and the history in the unit's StateDirectory.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_systemd_deb import BASE, MODEL, chat, installed, wait_until  # noqa: F401 - installed is a fixture

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

SOCKET = "/run/sparkd/sparkd.sock"


def test_sparkctl_over_the_admin_socket_of_the_service(installed: Any) -> None:  # noqa: F811 - the fixture imported above
    machine = installed
    wait_until(lambda: machine.out("systemctl is-active sparkd || true") == "active", 60, "sparkd to be active")
    wait_until(lambda: machine.sh(f"test -S {SOCKET}", check=False).returncode == 0, 30, "the admin socket")
    assert machine.out(f"stat -c '%U:%G %a' {SOCKET}") == "sparkd:sparkd 660"
    assert machine.out("readlink -f /usr/bin/sparkctl") == "/opt/venvs/sparkd/bin/sparkctl"
    assert MODEL in machine.out("sparkctl status")

    # The socket's permissions are the access control: the sparkd group yes, anyone else no.
    machine.sh("useradd -m -G sparkd opsuser && useradd -m outsider")
    member = machine.out("setpriv --reuid=opsuser --regid=opsuser --init-groups sparkctl models")
    assert MODEL in member and "enabled" in member
    denied = machine.sh("setpriv --reuid=outsider --regid=outsider --init-groups sparkctl status", check=False)
    assert denied.returncode == 3 and "permission denied" in denied.stderr and "sparkd group" in denied.stderr, denied

    status, body = asyncio.run(chat(machine, "counted by the history"))
    assert status == 200, body
    assert "stopped" in machine.out(f"sparkctl stop {MODEL}")  # ends the session: its requests are written
    history = json.loads(machine.out(f"sparkctl history {MODEL} --json"))
    assert history["path"] == "/var/lib/sparkd/history.sqlite3"
    assert history["models"][MODEL]["requests"] >= 1 and history["models"][MODEL]["loads"] >= 1
    assert history["sessions"][0]["end_reason"] == "stopped by an operator"

    metrics = machine.out(f"curl -s --unix-socket {SOCKET} http://sparkd/metrics")
    assert f'sparkd_requests_total{{model="{MODEL}",status="200"}}' in metrics
    assert "sparkd_host_memory_available_bytes" in metrics
    assert machine.out(f"curl -s -o /dev/null -w '%{{http_code}}' {BASE}/") == "200"
