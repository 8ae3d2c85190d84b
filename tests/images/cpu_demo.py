#!/usr/bin/env python3
"""Build the sparkd CPU demo model image (SmolLM2-135M on llama-cpp-python).

No container registry is reachable on the development and CI machines, so the
public base images the Containerfile defaults to cannot be pulled. The two Debian
bookworm bases it needs come from the product's own fallback (sparkd/localbase.py,
the code `sparkd images build` uses where no registry answers: debootstrap from the
package mirror, imported through the Podman API), then ``containerfiles/smollm2-cpu``
is built on top of them:

    localhost/sparkd/base-smollm2-runtime:<hash>   runtime base (python3, venv; no compiler)
    localhost/sparkd/base-smollm2-builder:<hash>   wheel-building base (+ gcc, g++, cmake, ninja)
    localhost/sparkd/smollm2-cpu:<hash>            the demo image, also tagged :latest

Everything is keyed by a content hash of its inputs, and nothing is rebuilt
when its tag exists. The compile is also cached on disk, under
``/var/cache/sparkd-test`` (``SPARKD_TEST_CACHE`` overrides):

    wheels/<hash>/llama_cpp_python-*.whl the compiled llama.cpp (minutes on 2 cores)

The final build still runs through the podman CLI, not the product's API build: it
bind-mounts the CA bundle and the wheel cache into the build steps (``-v``), which
the Podman API's build does not offer.

pip inside the build reaches PyPI through this machine's TLS-inspecting proxy:
the host CA bundle (``SPARKD_BUILD_CA``, else ``PIP_CERT``, else
``/etc/ssl/certs/ca-certificates.crt``) is bind-mounted into the build steps
only; it is never copied into an image.

Usage: python3 tests/images/cpu_demo.py [--force] [--print-tag]
Runs with the suite's venv (podman-py) and this checkout's sparkd package; drives the
``podman`` CLI for the builds. Importable: ``ensure_image()``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTEXT = REPO / "containerfiles" / "smollm2-cpu"
CONTEXT_FILES = ("Containerfile", "serve.py", "constraints.txt")

IMAGE_REPO = "localhost/sparkd/smollm2-cpu"
IMAGE_LATEST = f"{IMAGE_REPO}:latest"
WHEELS_REPO = "localhost/sparkd/smollm2-cpu-wheels"

BASE_ARGS = {
    # name: the recipe's build argument naming that base
    "runtime": "BASE_IMAGE",
    "builder": "BUILDER_IMAGE",
}

CA_IN_BUILD = "/run/sparkd-build-ca.pem"
PODMAN_URL = os.environ.get("SPARKD_TEST_PODMAN_URL", "unix:///run/podman/podman.sock")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test"))


def log(msg: str) -> None:
    print(f"[cpu_demo] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref]).returncode == 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def product_base(name: str):
    """The product's description of a base (sparkd.images), made by sparkd.localbase."""
    sys.path.insert(0, str(REPO))
    from sparkd.images import recipe_named

    recipe = recipe_named("smollm2-cpu")
    assert recipe is not None
    return next(b for b in recipe.debian_bases if b.build_arg == BASE_ARGS[name])


def base_hash(name: str) -> str:
    return product_base(name).tag().rsplit(":", 1)[1]


def context_digest() -> str:
    h = hashlib.sha256()
    for name in CONTEXT_FILES:
        h.update(name.encode() + b"\0" + (CONTEXT / name).read_bytes() + b"\0")
    return h.hexdigest()


def image_hash() -> str:
    spec = {
        "context": context_digest(),
        "runtime": base_hash("runtime"),
        "builder": base_hash("builder"),
    }
    return _sha(json.dumps(spec, sort_keys=True).encode())


def wheel_hash() -> str:
    # The compiled wheel depends on the builder base and the recipe of the
    # wheels stage (versions, CMAKE_ARGS, constraints); keyed conservatively
    # on the whole Containerfile and constraints.
    h = hashlib.sha256()
    h.update(base_hash("builder").encode())
    for name in ("Containerfile", "constraints.txt"):
        h.update((CONTEXT / name).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- bases

def ensure_base(name: str, timings: dict) -> str:
    """The product's code path (`sparkd images build` where no registry answers)."""
    from podman import PodmanClient

    sys.path.insert(0, str(REPO))
    from sparkd.localbase import ensure_base as make_base

    t = time.monotonic()
    with PodmanClient(base_url=PODMAN_URL, timeout=None) as client:
        ref = make_base(client, product_base(name))
    timings[f"base {name}"] = time.monotonic() - t
    return ref


# ---------------------------------------------------------------- image

def _ca_file() -> str | None:
    for cand in (
        os.environ.get("SPARKD_BUILD_CA"),
        os.environ.get("PIP_CERT"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _build(tag: str, runtime: str, builder: str, wheels_dir: Path, target: str | None) -> None:
    cmd = [
        "podman", "build", "--pull=never", "--layers",
        "--build-arg", f"BASE_IMAGE={runtime}",
        "--build-arg", f"BUILDER_IMAGE={builder}",
        "-v", f"{wheels_dir}:/opt/prebuilt-wheels:ro",
        "-t", tag,
    ]
    ca = _ca_file()
    if ca:
        cmd += ["-v", f"{ca}:{CA_IN_BUILD}:ro", "--build-arg", f"PIP_CA_FILE={CA_IN_BUILD}"]
    if target:
        cmd += ["--target", target]
    cmd.append(str(CONTEXT))
    run(cmd)


def _harvest_wheel(wheels_image: str, wheels_dir: Path) -> None:
    """Copy the compiled llama_cpp_python wheel out of the wheels stage."""
    cid = subprocess.run(
        ["podman", "create", wheels_image, "true"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(dir=wheels_dir.parent) as tmp:
            run(["podman", "cp", f"{cid}:/wheels/.", tmp])
            found = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
            if not found:
                raise RuntimeError("no llama_cpp_python wheel in the wheels stage")
            for whl in found:
                shutil.copy2(whl, wheels_dir / (whl.name + ".partial"))
                os.replace(wheels_dir / (whl.name + ".partial"), wheels_dir / whl.name)
                log(f"cached {wheels_dir / whl.name}")
    finally:
        subprocess.run(["podman", "rm", "-f", cid], check=False, capture_output=True)


def prune_stale(keep: dict[str, str]) -> None:
    """Drop this script's older tags and cache entries (other hashes).

    Plain `podman rmi` (no --force): an image a container still uses stays.
    """
    for repo, tag in keep.items():
        out = subprocess.run(
            ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={repo}"],
            capture_output=True, text=True,
        ).stdout.split()
        for ref in sorted(set(out) - {tag, IMAGE_LATEST}):
            if ref.startswith(repo + ":"):
                subprocess.run(["podman", "rmi", ref], capture_output=True)
    for d in (cache_dir() / "wheels").glob("*"):
        if d.is_dir() and d.name != wheel_hash():
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _build_lock():
    """One build at a time per machine: a second caller (another test run)
    waits here, then finds the tag built."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "cpu_demo.lock", "w") as f:
        t = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        if time.monotonic() - t > 1:
            log(f"waited {time.monotonic() - t:.0f}s for another build")
        yield


def ensure_image(force: bool = False) -> str:
    """Build (if needed) and return ``localhost/sparkd/smollm2-cpu:<hash>``;
    ``:latest`` points at it afterwards."""
    with _build_lock():
        return _ensure_image(force)


def _ensure_image(force: bool) -> str:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    h = image_hash()
    ref = f"{IMAGE_REPO}:{h}"
    if not force and image_exists(ref):
        log(f"{ref} exists, nothing to build")
        run(["podman", "tag", ref, IMAGE_LATEST])
        return ref

    runtime = ensure_base("runtime", timings)
    builder = ensure_base("builder", timings)

    wheels_dir = cache_dir() / "wheels" / wheel_hash()
    wheels_dir.mkdir(parents=True, exist_ok=True)
    if not any(wheels_dir.glob("llama_cpp_python-*.whl")):
        t = time.monotonic()
        wheels_image = f"{WHEELS_REPO}:{h}"
        _build(wheels_image, runtime, builder, wheels_dir, target="wheels")
        timings["wheels stage (compile llama.cpp)"] = time.monotonic() - t
        _harvest_wheel(wheels_image, wheels_dir)
        subprocess.run(["podman", "rmi", wheels_image], check=False, capture_output=True)
    else:
        log(f"using cached wheel(s) in {wheels_dir}")

    t = time.monotonic()
    _build(ref, runtime, builder, wheels_dir, target=None)
    timings["final image"] = time.monotonic() - t
    run(["podman", "tag", ref, IMAGE_LATEST])
    timings["total"] = time.monotonic() - t0
    prune_stale({
        IMAGE_REPO: ref,
        runtime.rsplit(":", 1)[0]: runtime,
        builder.rsplit(":", 1)[0]: builder,
    })

    size = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", ref],
        capture_output=True, text=True,
    ).stdout.strip()
    for k, v in timings.items():
        log(f"time {k}: {v:.1f}s")
    if size.isdigit():
        log(f"size {ref}: {int(size) / 1e6:.0f} MB")
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild the image even if its tag exists")
    ap.add_argument("--print-tag", action="store_true", help="print the content-hash tag and exit")
    args = ap.parse_args()
    if args.print_tag:
        print(f"{IMAGE_REPO}:{image_hash()}")
        return 0
    if shutil.which("podman") is None:
        print("podman is not installed", file=sys.stderr)
        return 1
    print(ensure_image(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
