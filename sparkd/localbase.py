"""Debian base images made from the distribution's package mirror, for hosts no registry answers.

A recipe's FROM images (``python:3.11-slim-bookworm``, ...) come from a public container
registry. Air-gapped homelabs with a local Debian mirror, and CI machines that reach only
their package mirror and PyPI, cannot pull them; `sparkd images build` then makes an
equivalent base with debootstrap (a minimal Debian root with the packages the recipe
needs), imports it into Podman as ``localhost/sparkd/base-<name>:<hash>`` and builds on
that. The tag is a hash of what goes into the root, so a second build reuses it.

Synchronous and slow (minutes): called from the command line only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MIRROR_ENV = "SPARKD_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_REPOSITORY = "localhost/sparkd/base"
# Bump when the way a root is made changes in a way its inputs do not show.
RECIPE_VERSION = 1
WORK_DIR = Path("/var/tmp")  # noqa: S108 - only ever the parent of a private TemporaryDirectory
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BaseBuildError(RuntimeError):
    """A base could not be made; the message says which step failed and what to do."""


@dataclass(frozen=True)
class DebianBase:
    name: str
    """Short name, part of the tag (``runtime``, ``builder``)."""
    build_arg: str
    """The recipe's build argument naming this base (``BASE_IMAGE``)."""
    registry_image: str
    """The image the recipe uses when a registry answers (its build argument's default)."""
    packages: tuple[str, ...]
    suite: str = "bookworm"

    def tag(self, mirror: str | None = None) -> str:
        spec: dict[str, Any] = {
            "recipe": RECIPE_VERSION,
            "suite": self.suite,
            "variant": "minbase",
            "arch": platform.machine(),
            "packages": sorted(self.packages),
        }
        mirror = chosen_mirror(mirror)
        if mirror != DEFAULT_MIRROR:
            # Another mirror may serve other package versions (a stale local copy).
            spec["mirror"] = mirror
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return f"{BASE_REPOSITORY}-{self.name}:{digest}"


def chosen_mirror(mirror: str | None = None) -> str:
    return mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR


class Progress:
    """One status line per long step: rewritten in place on a terminal, at most every
    ``interval_s`` as a new line otherwise (a build log, CI)."""

    def __init__(self, label: str, stream: IO[str] = sys.stdout, interval_s: float = 10.0) -> None:
        self.label = label
        self.stream = stream
        self.interactive = stream.isatty()
        self.interval_s = interval_s
        self.last_line = 0.0
        self.started = time.monotonic()

    def update(self, text: str, force: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{self.label}] {elapsed:5.0f}s {text}"
        if self.interactive:
            self.stream.write("\r\x1b[K" + line[:160])
            self.stream.flush()
        elif force or time.monotonic() - self.last_line >= self.interval_s:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_line = time.monotonic()

    def done(self, text: str) -> None:
        if self.interactive:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"[{self.label}] {text} ({time.monotonic() - self.started:.0f}s)\n")
        self.stream.flush()


def ensure_base(client: Any, base: DebianBase, mirror: str | None = None) -> str:
    """The tag of ``base`` in Podman, made with debootstrap from ``mirror`` if missing."""
    mirror = chosen_mirror(mirror)
    tag = base.tag(mirror)
    if client.images.exists(tag):
        print(f"[base {base.name}] {tag} is there already", flush=True)
        return tag
    if os.geteuid() != 0:
        raise BaseBuildError("debootstrap needs root: run `sudo sparkd images build ...`")
    if shutil.which("debootstrap") is None:
        raise BaseBuildError("debootstrap is not installed: `sudo apt-get install debootstrap`, then build again")
    with tempfile.TemporaryDirectory(prefix=f"sparkd-base-{base.name}-", dir=WORK_DIR) as work:
        root = Path(work) / "root"
        try:
            _debootstrap(base, root, mirror)
            _trim(root, base.suite, mirror)
        finally:
            _unmount_below(root)
        tarball = Path(work) / "root.tar"
        _pack(base, root, tarball)
        shutil.rmtree(root, ignore_errors=True)
        _import(client, base, tarball, tag)
    return tag


def _debootstrap(base: DebianBase, root: Path, mirror: str) -> None:
    progress = Progress(f"base {base.name}")
    progress.update(f"debootstrap {base.suite} from {mirror} (a minute or two)", force=True)
    command = [
        "debootstrap", "--variant=minbase", f"--include={','.join(base.packages)}", base.suite, str(root), mirror,
    ]
    counts = {"Retrieving": 0, "Validating": 0, "Extracting": 0, "Unpacking": 0, "Configuring": 0}
    tail: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        assert process.stdout is not None
        for line in _lines(process.stdout):
            tail = [*tail, line][-25:]
            words = line.split()
            if len(words) >= 3 and words[0] == "I:" and words[1] in counts:
                counts[words[1]] += 1
                progress.update(f"{words[1].lower()} {words[2]} ({counts[words[1]]} packages)")
            elif line.startswith("I: "):
                progress.update(line[3:], force=True)
    if process.returncode != 0:
        detail = "\n".join(tail)
        raise BaseBuildError(
            f"debootstrap of the {base.name} base failed (exit {process.returncode}) with mirror {mirror}; "
            f"set {MIRROR_ENV} to a reachable Debian mirror, or make {base.registry_image} available to Podman\n{detail}"
        )
    progress.done(f"Debian {base.suite} root with {', '.join(base.packages)}")


def _lines(stream: IO[str]) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def _trim(root: Path, suite: str, mirror: str) -> None:
    """No downloaded packages or apt lists in the image; apt pointed at the same mirror."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / sub).glob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    (root / "etc/apt/sources.list").write_text(f"deb {mirror} {suite} main\n")


def _unmount_below(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the new root; none may be left behind."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def _pack(base: DebianBase, root: Path, tarball: Path) -> None:
    progress = Progress(f"base {base.name}")
    progress.update("packing the root file system", force=True)
    # --numeric-owner: the image must not depend on this host's user names.
    result = subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BaseBuildError(f"packing the {base.name} base failed: {result.stderr.strip()[-500:]}")
    progress.done(f"packed {tarball.stat().st_size / 1e6:.0f} MB")


class _CountingReader:
    """A file whose reads report progress (the import streams it to Podman)."""

    def __init__(self, file: IO[bytes], total: int, progress: Progress) -> None:
        self.file = file
        self.total = total
        self.sent = 0
        self.progress = progress

    def __len__(self) -> int:
        # requests sends a Content-Length for a body with a length, instead of chunks.
        return self.total

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        self.sent += len(chunk)
        self.progress.update(f"importing into Podman: {self.sent / 1e6:.0f} of {self.total / 1e6:.0f} MB")
        return chunk


def _import(client: Any, base: DebianBase, tarball: Path, tag: str) -> None:
    progress = Progress(f"base {base.name}")
    params = {"reference": tag, "changes": ["ENV LANG=C.UTF-8", f"ENV PATH={IMAGE_PATH}", 'CMD ["/bin/bash"]']}
    with tarball.open("rb") as file:
        body = _CountingReader(file, tarball.stat().st_size, progress)
        response = client.api.post("/images/import", params=params, data=body, headers={"Content-Type": "application/x-tar"})
    if response.status_code >= 400:
        raise BaseBuildError(f"Podman refused to import the {base.name} base: {response.text[:500]}")
    progress.done(f"imported as {tag}")
