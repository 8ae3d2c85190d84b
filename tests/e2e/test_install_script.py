"""The README's install command on a fresh host: packaging/install.sh.

A fresh Debian machine with systemd as PID 1, Podman installed but its socket
not enabled, no NVIDIA CDI spec, nothing configured. install.sh (given the .deb
built from this checkout, so the test needs no PyPI) must enable podman.socket,
install the package, and leave sparkd running on the shipped default
configuration, listening on 127.0.0.1:8009 with the keys it generated; then
README's curl example, run as written, gets an answer from the CPU demo model.

The machine's own Podman holds the CPU demo image, loaded from the host (no
registry answers here; built by tests/images/cpu_demo.py), so install.sh finds it
and builds nothing; and it gets the test-machine Podman settings tests/setup/host.sh
gives the host (install.sh changes nothing on a systemd host).
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from readme import quick_start

from harness import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.podman]


def test_install_script_on_a_fresh_host(fresh_machine: Any, deb_path: Any, cpu_demo_image: str) -> None:
    machine = fresh_machine
    assert machine.out("systemctl is-enabled podman.socket || true") in ("enabled", "disabled")
    machine.sh("systemctl disable --now podman.socket")
    machine.sh("mkdir -p /root/sparkd/packaging")
    for source, target in ((REPO / "packaging" / "install.sh", "/root/sparkd/packaging/install.sh"), (deb_path, f"/root/{deb_path.name}")):
        copy = subprocess.run(["podman", "cp", str(source), f"{machine.name}:{target}"], capture_output=True, text=True, timeout=120, check=False)
        assert copy.returncode == 0, copy.stderr

    machine.load_image(cpu_demo_image, "localhost/sparkd/smollm2-cpu:latest")
    machine.write("/etc/containers/containers.conf", machine.TEST_MACHINE_CONTAINERS_CONF)
    machine.install_sudo_shim()

    result = machine.sh(f"/root/sparkd/packaging/install.sh --deb /root/{deb_path.name} 2>&1", timeout=600)
    print(result.stdout[-2500:])
    assert "mode: systemd is PID 1 here" in result.stdout
    assert "the CPU demo model's image is already there" in result.stdout
    assert "sparkd is running (mode: systemd service)" in result.stdout
    assert "CHANGING THIS HOST'S PODMAN SETTINGS" not in result.stdout

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

    # README's curl example, as written, answers from the shipped demo model.
    machine.write("/root/readme-curl.sh", quick_start().curl_example)
    answer = machine.sh("bash /root/readme-curl.sh", timeout=600)
    print(answer.stdout[:1000])
    reply = json.loads(answer.stdout)
    assert reply["choices"][0]["message"]["content"].strip() and reply["usage"]["completion_tokens"] > 0, reply

    # Running it again (an upgrade in place) keeps the keys and the service.
    machine.sh(f"/root/sparkd/packaging/install.sh --deb /root/{deb_path.name}", timeout=600)
    assert machine.out("cat /etc/sparkd/keys.toml") == keys
    assert machine.out("systemctl is-active sparkd") == "active"
