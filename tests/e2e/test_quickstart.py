"""README's quick start, as written, on a fresh Debian machine without systemd (issue 12).

The commands and the curl example are read from README.md's "Quick start" section
(tests/e2e/readme.py), never copied here, so README and test cannot drift.

The machine: a container of the debootstrap-built Debian image (tests/images/build.py
systemd) whose PID 1 is `sleep`, not systemd, with its own network and its own, empty
Podman storage: nothing in it reaches the host's Podman or ports. A checkout of this
tree is copied to /root/sparkd, as a fresh clone. Three things are prepared that this
CI's network forces, none of which is a step of the quick start:
  * the CPU demo image is loaded from the host's Podman (no container registry
    answers here, so it is built once on the host by tests/images/cpu_demo.py);
  * the .deb built on the host from the same sources is put where build-deb.sh finds a
    cached build of them (the machine would otherwise reach PyPI through a proxy whose
    CA it does not trust); install.sh still installs the packaging tools with apt;
  * `sudo` runs the command as is (the machine's shell is root and has no sudo).

The first command (`sudo ./packaging/install.sh`) runs verbatim; then the curl example
runs verbatim and must get a real chat answer from SmolLM2. The second command (`sudo
./tests/run-all.sh`, the whole suite) is not run here: it would run this test inside
itself. It is checked instead to be exactly what CI runs (.ci/run execs it), and CI
running it is what proves it. The same machine then runs the install command again
(an upgrade in place keeps keys and configuration) and the stop command the first run
printed (it stops sparkd and its model containers).

Prints `RESULT quickstart_seconds <s> s`: fresh machine to the first answer.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from readme import quick_start

from harness import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.podman]

CHECKOUT = "/root/sparkd"
DEMO_IMAGE = "localhost/sparkd/smollm2-cpu:latest"
DEMO_MODEL = "smollm2-135m-cpu"
INSTALL_TIMEOUT_S = 1200


class QuickStarted:
    def __init__(self, machine: Any, install_output: str, started: float) -> None:
        self.machine = machine
        self.install_output = install_output
        self.started = started


def in_checkout(machine: Any, command: str, timeout: float) -> str:
    result = machine.sh(f"cd {CHECKOUT} && {command} 2>&1", check=False, timeout=timeout)
    print(result.stdout[-6000:])
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{result.stdout[-4000:]}"
    return str(result.stdout)


def run_curl_example(machine: Any) -> dict[str, Any]:
    example = quick_start().curl_example
    machine.write("/root/readme-curl.sh", example)
    result = machine.sh("bash /root/readme-curl.sh", check=False, timeout=600)
    assert result.returncode == 0, f"README's curl example failed ({result.returncode}): {result.stdout} {result.stderr}"
    try:
        return dict(json.loads(result.stdout))
    except ValueError:
        raise AssertionError(f"README's curl example got no JSON answer: {result.stdout[:2000]}") from None


def assert_real_answer(answer: dict[str, Any]) -> str:
    assert "error" not in answer, answer
    text = answer["choices"][0]["message"]["content"]
    assert isinstance(text, str) and re.search(r"[A-Za-z]{2,}", text), answer
    assert answer["usage"]["completion_tokens"] > 0, answer
    return text


@pytest.fixture(scope="module")
def quick_started(cpu_demo_image: str, deb_path: Path, plain_machine: Any) -> QuickStarted:
    # The clock starts before the machine boots (plain_machine is set up first).
    machine = plain_machine
    started = machine.booted_at
    machine.copy_checkout(CHECKOUT)
    machine.install_sudo_shim()
    machine.load_image(cpu_demo_image, DEMO_IMAGE)
    machine.seed_deb_cache(CHECKOUT, deb_path)
    output = in_checkout(machine, quick_start().commands[0], INSTALL_TIMEOUT_S)
    return QuickStarted(machine, output, started)


def test_readme_commands_are_the_install_and_what_ci_runs() -> None:
    commands = quick_start().commands
    assert commands == ("sudo ./packaging/install.sh", "sudo ./tests/run-all.sh"), commands
    ci = (REPO / ".ci" / "run").read_text()
    execs = re.findall(r"^\s*exec\s+(.+)$", ci, re.M)
    assert execs == [commands[1].removeprefix("sudo ").strip()], ci


def test_quick_start_answers_from_smollm2(quick_started: QuickStarted) -> None:
    output = quick_started.install_output
    assert "mode: no systemd as PID 1 here" in output
    assert "sparkd is running (mode: background, no systemd)" in output
    # This kind of machine needs the Podman settings, and install.sh says it changed them.
    assert "CHANGING THIS HOST'S PODMAN SETTINGS" in output
    dropin = quick_started.machine.out("cat /etc/containers/containers.conf.d/50-sparkd.conf")
    assert re.search(r'default_ulimits = \["nofile=\d+:\d+","nproc=\d+:\d+"\]', dropin), dropin
    text = assert_real_answer(run_curl_example(quick_started.machine))
    seconds = time.monotonic() - quick_started.started
    print(f"SmolLM2 answered README's curl: {text!r}")
    print(f"RESULT quickstart_seconds {seconds:.1f} s")
    machine = quick_started.machine
    assert machine.out("ps -eo user=,args= | grep '[s]parkd serve' | awk '{print $1}'") == "sparkd"
    assert "event=model_ready" in machine.out("cat /var/log/sparkd/sparkd.log")


def test_install_again_upgrades_in_place_keeping_keys_and_configuration(quick_started: QuickStarted) -> None:
    machine = quick_started.machine
    keys = machine.out("cat /etc/sparkd/keys.toml")
    machine.sh("sed -i 's/^idle_stop_s = 1200.0/idle_stop_s = 1500.0/' /etc/sparkd/sparkd.toml")
    machine.write("/etc/sparkd/models.d/90-local.toml", "# my own models\n")
    old_pid = machine.out("cat /run/sparkd-background.pid")
    output = in_checkout(machine, quick_start().commands[0], INSTALL_TIMEOUT_S)
    assert "sparkd-background: stopping sparkd" in output and "sparkd is running (mode: background" in output
    # Its own Podman settings from the first run are found: nothing is changed twice.
    assert "CHANGING THIS HOST'S PODMAN SETTINGS" not in output and "did not stop within" not in output
    assert machine.out("cat /etc/sparkd/keys.toml") == keys
    assert "idle_stop_s = 1500.0" in machine.out("cat /etc/sparkd/sparkd.toml")
    assert machine.out("cat /etc/sparkd/models.d/90-local.toml") == "# my own models"
    assert machine.out("cat /run/sparkd-background.pid") != old_pid
    assert_real_answer(run_curl_example(machine))


def test_the_printed_stop_command_stops_sparkd(quick_started: QuickStarted) -> None:
    machine = quick_started.machine
    stop = re.search(r"^\s+stop\s+(.+?)\s*$", quick_started.install_output, re.M)
    assert stop, quick_started.install_output[-3000:]
    machine.sh(stop.group(1), timeout=180)
    assert machine.sh("curl -s --max-time 3 http://127.0.0.1:8009/healthz", check=False).returncode != 0
    assert machine.out("ps -eo args= | grep -c '[s]parkd serve' || true") == "0"
    # on_shutdown = "stop" (shipped default): its model container is stopped too.
    running = machine.out("podman ps --filter label=io.sparkd.managed=true --format '{{.Names}}'")
    assert running == "", running
    assert machine.sh("sparkd-background status", check=False).returncode == 3
