"""End-to-end fixtures: the built .deb, and a Debian machine with systemd as PID 1.

The machine is a container of the locally built ``sparkd-test-systemd`` image
run with ``--privileged --systemd=always --network host``. Its own ``podman.socket`` (from
Debian's podman package, with the drop-in the sparkd package installs) is real;
behind it, instead of a Podman inside the container, ``systemd-socket-proxyd``
relays to the host's Podman socket (bind-mounted at /run/host-podman). So the
sparkd under test reaches Podman exactly as on a real host, through socket
activation and the sparkd group's access, while the model containers it starts
run on the host's Podman and publish their ports on the shared 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness import PODMAN_URL, REPO

HOST_SOCKET = PODMAN_URL.removeprefix("unix://")
DEB_CACHE = Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test")) / "deb"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end to end under real systemd: builds the .deb and installs it into a systemd container")


def require(condition: bool, message: str) -> None:
    """Missing prerequisites fail under SPARKD_REQUIRE_PODMAN=1 (CI) and skip otherwise."""
    if condition:
        return
    if os.environ.get("SPARKD_REQUIRE_PODMAN") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _load_images_module() -> Any:
    spec = importlib.util.spec_from_file_location("sparkd_test_images_build", REPO / "tests" / "images" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def deb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sparkd .deb built from this checkout (cached by content hash)."""
    require(os.geteuid() == 0, "the end-to-end test runs as root (it drives the host's rootful Podman)")
    missing = [tool for tool in ("dpkg-buildpackage", "dh_virtualenv", "podman") if shutil.which(tool) is None]
    require(not missing, f"{', '.join(missing)} missing; run tests/setup/host.sh as root")
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "packaging" / "build-deb.sh"), "--out", str(out), "--cache", str(DEB_CACHE)],
        capture_output=True,
        text=True,
        timeout=900, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"packaging/build-deb.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"e2e: .deb {path.name} ready in {time.monotonic() - started:.1f}s ({proc.stderr.strip().splitlines()[0]})")
    return path


@pytest.fixture(scope="session")
def systemd_image(podman: Any) -> str:
    build = _load_images_module()
    tag = build.systemd_tag()
    if not podman.images.exists(tag):
        if os.environ.get("SPARKD_TEST_NO_BUILD") == "1":
            pytest.fail(f"image {tag} is missing; run: python3 tests/images/build.py systemd")
        try:
            build.build_systemd()
        except build.BuildError as error:
            pytest.fail(f"cannot build the systemd test image: {error}")
    return tag


class Machine:
    """A systemd container; ``sh`` runs a shell command in it as root."""

    # The test-machine Podman settings tests/setup/host.sh writes on the host (Podman's
    # default ulimits exceed the CI VMs' hard limits), for a machine's own Podman. Not
    # product settings: install.sh changes nothing on a systemd host.
    TEST_MACHINE_CONTAINERS_CONF = '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'

    def __init__(self, name: str, booted_at: float | None = None) -> None:
        self.name = name
        self.booted_at = time.monotonic() if booted_at is None else booted_at
        """When the machine's container was asked to start (monotonic clock)."""

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", "exec", self.name, "sh", "-c", command], capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the machine: `{command}` exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
        return proc

    def out(self, command: str, timeout: float = 120) -> str:
        return self.sh(command, timeout=timeout).stdout.strip()

    def show(self, *properties: str, unit: str = "sparkd.service") -> dict[str, str]:
        text = self.out(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in properties))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def write(self, path: str, content: str, mode: str = "0644") -> None:
        proc = subprocess.run(
            ["podman", "exec", "-i", self.name, "sh", "-c", f"mkdir -p \"$(dirname {path})\" && cat > {path} && chmod {mode} {path}"],
            input=content,
            capture_output=True,
            text=True,
            timeout=30, check=False,
        )
        assert proc.returncode == 0, proc.stderr

    def journal(self, args: str = "") -> str:
        return self.out(f"journalctl --no-pager -u sparkd.service {args}")

    def use_own_container_subnet(self) -> None:
        """The machine itself sits on the host Podman's 10.88.0.0/16 bridge, the subnet its
        own Podman would pick too: its containers' published ports would lead nowhere
        ("No route to host"). Nesting plumbing, before its Podman first runs."""
        self.write("/etc/containers/containers.conf.d/10-e2e-nested-network.conf", '[network]\ndefault_subnet = "10.99.0.0/16"\n')
        # Podman 4.3 with CNI (Debian 12) takes its default network from this file instead.
        self.sh("f=/etc/cni/net.d/87-podman-bridge.conflist; [ ! -f $f ] || sed -i 's/10[.]88[.]/10.99./g' $f")

    def load_image(self, image: str, as_name: str) -> None:
        """Copy an image from the host's Podman into the machine's own Podman (no registry here)."""
        save = subprocess.Popen(["podman", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["podman", "exec", "-i", self.name, "podman", "load", "-q"], stdin=save.stdout, capture_output=True, text=True, timeout=600, check=False)
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(timeout=60) == 0 and load.returncode == 0, load.stderr
        if image != as_name:
            self.sh(f"podman tag {image} {as_name}")

    def install_sudo_shim(self) -> None:
        """README's commands say `sudo`; the machine's shell is root already and has no sudo."""
        self.write("/usr/local/bin/sudo", '#!/bin/sh\n[ "$(id -u)" -eq 0 ] || exit 1\nexec "$@"\n', mode="0755")

    def copy_checkout(self, target: str) -> None:
        """This checkout's files (tracked and new, nothing git ignores), as a fresh clone has them."""
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True).stdout
        existing = b"\0".join(f for f in files.split(b"\0") if f and (REPO / f.decode()).exists())
        tar = subprocess.Popen(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        untar = subprocess.Popen(["podman", "exec", "-i", self.name, "sh", "-c", f"mkdir -p {target} && tar -C {target} -xf -"], stdin=tar.stdout)
        assert tar.stdin is not None and tar.stdout is not None
        tar.stdin.write(existing)
        tar.stdin.close()
        tar.stdout.close()
        assert tar.wait(timeout=120) == 0 and untar.wait(timeout=120) == 0

    def seed_deb_cache(self, checkout: str, deb_path: Path) -> None:
        """Put the .deb built on the host (deb_path) where build-deb.sh in the machine looks
        for a cached build of the same sources, so the machine needs no PyPI (this CI reaches
        PyPI only through a proxy whose CA a fresh machine does not trust)."""
        digest = self.out(f"cd {checkout} && ./packaging/build-deb.sh --print-hash")
        host = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), "--print-hash"], capture_output=True, text=True, check=True).stdout.strip()
        # The same sources on both sides, else this would pass off another build as theirs.
        assert digest == host, f"the machine's checkout hashes to {digest}, this checkout to {host}: files changed during the test run?"
        self.sh(f"mkdir -p /var/cache/sparkd-build/{digest}")
        proc = subprocess.run(["podman", "cp", str(deb_path), f"{self.name}:/var/cache/sparkd-build/{digest}/{deb_path.name}"], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr


def boot_machine(image: str, *, host_network: bool, extra: list[str] = ()) -> Machine:
    """Start a systemd container and wait until systemd has booted it."""
    name = "sparkd-e2e-" + uuid.uuid4().hex[:8]
    run = subprocess.run(
        [
            # --privileged: systemd sandboxes services (PrivateUsers=, PrivateIPC=, ...)
            # the way it does as a real host's PID 1; without it, namespace set-up
            # for ExecReload fails with 226/NAMESPACE. The image masks the units
            # that would touch the host's kernel settings.
            "podman", "run", "-d", "--name", name, "--privileged", "--systemd=always",
            *(["--network", "host"] if host_network else []),
            "--hostname", name, *extra,
            image, "/sbin/init",
        ],
        capture_output=True,
        text=True,
        timeout=120, check=False,
    )
    if run.returncode != 0:
        pytest.fail(f"cannot start the systemd container: {run.stderr}")
    box = Machine(name)
    # Right after `podman run`, systemctl may not reach PID 1 yet: poll.
    deadline, state = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        proc = box.sh("systemctl is-system-running --wait", check=False, timeout=90)
        state = (proc.stdout + proc.stderr).strip()
        if state in ("running", "degraded"):
            break
        time.sleep(0.5)
    if state not in ("running", "degraded"):
        failed = box.sh("systemctl --failed --no-legend", check=False).stdout
        remove_machine(box)
        pytest.fail(f"systemd in the container did not boot: {state}\n{failed}")
    return box


def remove_machine(box: Machine) -> None:
    if os.environ.get("SPARKD_E2E_KEEP") == "1":
        print(f"e2e: keeping the machine container {box.name} (SPARKD_E2E_KEEP=1)")
        return
    subprocess.run(["podman", "rm", "-f", "-t", "5", box.name], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def machine(podman: Any, systemd_image: str) -> Any:
    """A machine on the host's network whose podman.socket leads to the host's Podman."""
    require(os.path.exists(HOST_SOCKET), f"no Podman socket at {HOST_SOCKET}; run tests/setup/host.sh as root")
    box = boot_machine(systemd_image, host_network=True, extra=["-v", f"{HOST_SOCKET}:/run/host-podman/podman.sock"])
    try:
        # The container's podman.socket is served by a relay to the host's Podman
        # (test plumbing; on a real host podman.service is Podman itself).
        box.write(
            "/etc/systemd/system/podman.service.d/e2e-relay.conf",
            "[Service]\nType=notify\nExecStart=\nExecStart=/lib/systemd/systemd-socket-proxyd /run/host-podman/podman.sock\n",
        )
        box.sh("systemctl daemon-reload && systemctl restart podman.socket")
        assert box.out("curl -sf --unix-socket /run/podman/podman.sock http://d/_ping") == "OK"
        yield box
    finally:
        remove_machine(box)


@pytest.fixture(scope="module")
def fresh_machine(podman: Any, systemd_image: str) -> Any:
    """A machine with its own network and its own (empty) Podman, like a fresh host.

    Nothing in it can reach the host's Podman or ports, so the shipped default
    configuration (127.0.0.1:8009, instance "default") can run there safely.
    """
    # Podman's storage must not sit on the container's overlay root.
    # Podman's storage must hold the CPU demo image (loaded from the host, see load_image).
    box = boot_machine(systemd_image, host_network=False, extra=["--tmpfs", f"/var/lib/containers:rw,size={NESTED_STORAGE}"])
    try:
        box.use_own_container_subnet()
        yield box
    finally:
        remove_machine(box)


NESTED_STORAGE = "3g"


def boot_plain_machine(image: str) -> Machine:
    """A Debian machine whose PID 1 is not systemd (`sleep`), with its own network and
    its own empty Podman storage: the kind of host CI machines and containers are."""
    name = "sparkd-e2e-plain-" + uuid.uuid4().hex[:8]
    booted_at = time.monotonic()
    run = subprocess.run(
        [
            # --privileged: its own Podman runs containers inside it (nested).
            "podman", "run", "-d", "--name", name, "--privileged", "--hostname", name,
            "--tmpfs", f"/var/lib/containers:rw,size={NESTED_STORAGE}",
            image, "sleep", "infinity",
        ],
        capture_output=True,
        text=True,
        timeout=120, check=False,
    )
    if run.returncode != 0:
        pytest.fail(f"cannot start the machine container: {run.stderr}")
    box = Machine(name, booted_at)
    assert box.out("cat /proc/1/comm") == "sleep"
    assert box.sh("test -d /run/systemd/system", check=False).returncode != 0
    box.use_own_container_subnet()
    return box


@pytest.fixture(scope="module")
def plain_machine(podman: Any, systemd_image: str) -> Any:
    """A fresh Debian machine without systemd as PID 1 (boot_plain_machine)."""
    box = boot_plain_machine(systemd_image)
    try:
        yield box
    finally:
        remove_machine(box)
