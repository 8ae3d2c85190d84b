#!/usr/bin/env python3
"""Build the local test images, cached by content hash.

There is no container registry on the test machines, so every image the tests
need is built here from a Debian root made with debootstrap:

  base     localhost/sparkd-test-base:<hash>     Debian bookworm + python3-aiohttp + systemd
  engine   localhost/sparkd-test-engine:<hash>   base + tests/engine/fake_vllm.py (also :latest)
  systemd  localhost/sparkd-test-systemd:<hash>  base + podman, adduser: systemd as PID 1 for tests/e2e

Each tag is a hash of everything that goes into the image, so an unchanged
recipe is never rebuilt: a warm run only asks podman whether the tags exist.
The debootstrap tarball is also kept in /var/cache/sparkd-test/ so a lost
image is re-imported without the network.

Usage: build.py [base|engine|systemd|all] [--print-tags]
Stdlib only; it calls the podman CLI (test tooling, not the daemon).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Bump when the way an image is made changes in a way the inputs below don't show.
RECIPE_VERSION = "1"

SUITE = "bookworm"
VARIANT = "minbase"
MIRROR = os.environ.get("SPARKD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = (
    "python3",
    "python3-aiohttp",
    "systemd",
    "systemd-sysv",
    "dbus",
    "curl",
    "ca-certificates",
    "python3-venv",
    "procps",
)

CACHE_DIR = Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test"))
HERE = Path(__file__).resolve().parent
ENGINE_SOURCE = HERE.parent / "engine" / "fake_vllm.py"
ENGINE_CONTAINERFILE = HERE / "engine" / "Containerfile"
SYSTEMD_CONTAINERFILE = HERE / "systemd" / "Containerfile"

BASE_REPO = "localhost/sparkd-test-base"
ENGINE_REPO = "localhost/sparkd-test-engine"
SYSTEMD_REPO = "localhost/sparkd-test-systemd"


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


# ---------------------------------------------------------------- hashing


def _sha12(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        # Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:12]


def base_hash() -> str:
    # The mirror is deliberately not part of the hash: any mirror serves the same suite.
    recipe = json.dumps(
        {"packages": sorted(BASE_PACKAGES), "suite": SUITE, "variant": VARIANT,
         "recipe": RECIPE_VERSION},
        sort_keys=True,
    )
    return _sha12(recipe.encode())


def engine_hash() -> str:
    return _sha12(
        base_hash().encode(),
        ENGINE_SOURCE.read_bytes(),
        ENGINE_CONTAINERFILE.read_bytes(),
        RECIPE_VERSION.encode(),
    )


def systemd_hash() -> str:
    return _sha12(base_hash().encode(), SYSTEMD_CONTAINERFILE.read_bytes(), RECIPE_VERSION.encode())


def base_tag() -> str:
    return f"{BASE_REPO}:{base_hash()}"


def engine_tag() -> str:
    return f"{ENGINE_REPO}:{engine_hash()}"


def systemd_tag() -> str:
    return f"{SYSTEMD_REPO}:{systemd_hash()}"


def tags() -> dict[str, str]:
    """name -> full image tag, computed without touching podman."""
    return {
        "base": base_tag(),
        "engine": engine_tag(),
        "engine_latest": f"{ENGINE_REPO}:latest",
        "systemd": systemd_tag(),
    }


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise BuildError quoting its tail of output."""
    try:
        proc = subprocess.run(cmd, **kwargs)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} is not installed (run tests/setup/host.sh as root)") from exc
    if proc.returncode != 0:
        tail = ""
        if isinstance(proc.stderr, (str, bytes)) and proc.stderr:
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            tail = "\n" + "\n".join(err.strip().splitlines()[-20:])
        raise BuildError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}{tail}")
    return proc


def image_exists(tag: str) -> bool:
    proc = subprocess.run(["podman", "image", "exists", tag],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0


def tag_image(source: str, target: str) -> None:
    run(["podman", "tag", source, target], capture_output=True, text=True)


def prune_old_tags(repo: str, keep: str) -> None:
    """Untag this repo's older content-hash tags so stale builds don't pile up.

    Plain `podman rmi` (no --force) refuses an image a container still uses or one
    that another image is built on, so nothing in use is removed; errors are ignored.
    """
    proc = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}",
                           "--filter", f"reference={repo}"],
                          capture_output=True, text=True)
    old = [t for t in proc.stdout.split() if t not in (keep, f"{repo}:latest")]
    for tag in old:
        subprocess.run(["podman", "rmi", tag], capture_output=True, text=True)


def timed(name: str):
    """Decorator: print how long a build step took, even when it was a cache hit."""
    def wrap(fn):
        def inner(*args, **kwargs):
            start = time.monotonic()
            result = fn(*args, **kwargs)
            log(f"{name}: {result} ({time.monotonic() - start:.1f}s)")
            return result
        return inner
    return wrap


# ---------------------------------------------------------------- steps


def _debootstrap_tarball(h: str) -> Path:
    """Return the cached rootfs tarball for base hash h, making it if missing."""
    tarball = CACHE_DIR / f"base-{h}.tar"
    if tarball.exists():
        log(f"using cached rootfs {tarball}")
        return tarball
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root; run as root (see tests/setup/host.sh)")
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed (run tests/setup/host.sh as root)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"rootfs-{h}-", dir=CACHE_DIR) as tmp:
        root = Path(tmp) / "root"
        log(f"debootstrap {SUITE} ({VARIANT}) from {MIRROR} into {root} (about 80 s)")
        cmd = ["debootstrap", f"--variant={VARIANT}",
               f"--include={','.join(BASE_PACKAGES)}", SUITE, str(root), MIRROR]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            # debootstrap's own log names the failing package or download.
            debootstrap_log = root / "debootstrap" / "debootstrap.log"
            detail = debootstrap_log.read_text(errors="replace") if debootstrap_log.exists() else proc.stdout
            tail = "\n".join(detail.strip().splitlines()[-25:])
            raise BuildError(f"debootstrap failed (exit {proc.returncode}); mirror {MIRROR} "
                             f"(override with SPARKD_TEST_DEBIAN_MIRROR)\n{tail}")
        _trim_rootfs(root)
        partial = tarball.with_suffix(".tar.partial")
        # --numeric-owner: the image must not depend on the host's user names.
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
            capture_output=True, text=True)
        partial.rename(tarball)  # atomic: a half-written tarball is never "cached"
    return tarball


def _trim_rootfs(root: Path) -> None:
    """Drop downloaded .debs and apt lists: they only make the image bigger."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        d = root / sub
        if d.is_dir():
            for entry in d.iterdir():
                if entry.is_file() and entry.name != "lock":
                    entry.unlink()


@timed("base")
def build_base() -> str:
    tag = base_tag()
    if image_exists(tag):
        return f"{tag} exists"
    tarball = _debootstrap_tarball(base_hash())
    log(f"podman import {tarball.name} -> {tag}")
    run(["podman", "import",
         "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", "CMD=/bin/bash",
         str(tarball), tag], capture_output=True, text=True)
    prune_old_tags(BASE_REPO, tag)
    return f"{tag} built"


@timed("engine")
def build_engine() -> str:
    tag, latest, base = engine_tag(), f"{ENGINE_REPO}:latest", base_tag()
    if image_exists(tag):
        tag_image(tag, latest)  # :latest may point at an older build
        return f"{tag} exists"
    build_base()
    with tempfile.TemporaryDirectory(prefix="sparkd-engine-ctx-") as ctx:
        # A minimal context: only what the Containerfile copies, so the build is
        # as reproducible as the hash claims.
        shutil.copy2(ENGINE_SOURCE, Path(ctx) / "fake_vllm.py")
        shutil.copy2(ENGINE_CONTAINERFILE, Path(ctx) / "Containerfile")
        log(f"podman build -> {tag}")
        run(["podman", "build", "--pull=never", "--layers=false",
             "--build-arg", f"BASE={base}",
             "--label", f"io.sparkd.test.hash={engine_hash()}",
             "-f", str(Path(ctx) / "Containerfile"), "-t", tag, ctx],
            capture_output=True, text=True)
    tag_image(tag, latest)
    prune_old_tags(ENGINE_REPO, tag)
    return f"{tag} built"


@timed("systemd")
def build_systemd() -> str:
    """base + the sparkd .deb's dependencies (apt-get inside the build; about 20 s)."""
    tag, base = systemd_tag(), base_tag()
    if image_exists(tag):
        return f"{tag} exists"
    build_base()
    with tempfile.TemporaryDirectory(prefix="sparkd-systemd-ctx-") as ctx:
        shutil.copy2(SYSTEMD_CONTAINERFILE, Path(ctx) / "Containerfile")
        log(f"podman build -> {tag} (apt-get install from the Debian mirror)")
        run(["podman", "build", "--pull=never", "--layers=false", "--network=host",
             "--build-arg", f"BASE={base}",
             "--label", f"io.sparkd.test.hash={systemd_hash()}",
             "-f", str(Path(ctx) / "Containerfile"), "-t", tag, ctx],
            capture_output=True, text=True)
    prune_old_tags(SYSTEMD_REPO, tag)
    return f"{tag} built"


STEPS = {"base": [build_base], "engine": [build_engine], "systemd": [build_systemd],
         "all": [build_base, build_engine, build_systemd]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default="all", choices=sorted(STEPS))
    parser.add_argument("--print-tags", action="store_true",
                        help="print name=tag lines and exit without building")
    args = parser.parse_args(argv)

    if args.print_tags:
        for name, tag in tags().items():
            print(f"{name}={tag}")
        return 0

    if not shutil.which("podman"):
        print("build.py: podman is not installed (run tests/setup/host.sh as root)", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        for step in STEPS[args.target]:
            step()
    except BuildError as exc:
        print(f"build.py: {args.target} failed: {exc}", file=sys.stderr)
        return 1
    log(f"{args.target} done in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
