"""The README's install command on a fresh host: packaging/install.sh.

A fresh Debian machine with systemd as PID 1, Podman installed but its socket
not enabled, no NVIDIA CDI spec, nothing configured. install.sh (given the .deb
built from this checkout, so the test needs no PyPI) must enable podman.socket,
install the package, and leave sparkd running on the shipped default
configuration, listening on 127.0.0.1:8009 with the keys it generated.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from harness import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.podman]


def test_install_script_on_a_fresh_host(fresh_machine: Any, deb_path: Any) -> None:
    machine = fresh_machine
    assert machine.out("systemctl is-enabled podman.socket || true") in ("enabled", "disabled")
    machine.sh("systemctl disable --now podman.socket")
    machine.sh("mkdir -p /root/sparkd/packaging")
    for source, target in ((REPO / "packaging" / "install.sh", "/root/sparkd/packaging/install.sh"), (deb_path, f"/root/{deb_path.name}")):
        copy = subprocess.run(["podman", "cp", str(source), f"{machine.name}:{target}"], capture_output=True, text=True, timeout=120)
        assert copy.returncode == 0, copy.stderr

    # The CPU demo image would be built from public base images (docker.io):
    # not reachable here, and the catalog's job; the package is what this tests.
    result = machine.sh(f"/root/sparkd/packaging/install.sh --deb /root/{deb_path.name} --no-demo-image 2>&1", timeout=600)
    print(result.stdout[-2500:])
    assert "sparkd is running" in result.stdout

    assert machine.out("systemctl is-enabled podman.socket") == "enabled"
    assert machine.out("systemctl is-active sparkd") == "active"
    assert machine.out("systemctl is-enabled sparkd") == "enabled"
    assert machine.out("curl -sf http://127.0.0.1:8009/healthz") == '{"status": "ok"}'
    assert machine.out("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8009/readyz") == "200"
    # The shipped catalog's models are listed to a client with a generated key.
    keys = machine.out("cat /etc/sparkd/keys.toml")
    key = re.search(r'\[keys\.user\]\s*\nkey = "([^"]+)"', keys).group(1)
    models = machine.out(f"curl -sf -H 'Authorization: Bearer {key}' http://127.0.0.1:8009/v1/models")
    print(models[:1000])
    assert '"data"' in models

    # Running it again (an upgrade in place) keeps the keys and the service.
    machine.sh(f"/root/sparkd/packaging/install.sh --deb /root/{deb_path.name} --no-demo-image", timeout=600)
    assert machine.out("cat /etc/sparkd/keys.toml") == keys
    assert machine.out("systemctl is-active sparkd") == "active"
