#!/usr/bin/env python3
"""Build the sparkd CPU demo model image (SmolLM2-135M on llama-cpp-python).

The build IS the product's: ``sparkd.commands.images.build_recipe``, the function
`sparkd images build smollm2-cpu` runs, through the Podman API. No container registry
is reachable on the development and CI machines, so that function makes the recipe's
two bases from the Debian mirror (sparkd/localbase.py), and pip inside the build
reaches PyPI through this machine's TLS-inspecting proxy by the CA bundle the host's
pip uses (PIP_CERT, ...), which sparkd copies into the builder stage's context only
(sparkd/buildcontext.py; never into the image):

    localhost/sparkd/base-smollm2-runtime:<hash>   runtime base (python3, venv; no compiler)
    localhost/sparkd/base-smollm2-builder:<hash>   wheel-building base (+ gcc, g++, cmake, ninja)
    localhost/sparkd/smollm2-cpu:<hash>            the demo image, also tagged :latest

``<hash>`` covers the recipe directory, both bases' tags and whether pip got a CA
bundle; nothing is built when that tag exists. Podman's layer cache keeps the compiled
llama.cpp (the wheels stage), so `sparkd images build smollm2-cpu` of the same recipe
right after this reuses every layer (tests/integration/test_images_base_fallback.py).

Usage: python3 tests/images/cpu_demo.py [--force] [--print-tag]
Runs with the suite's venv (podman-py) and this checkout's sparkd package.
Importable: ``ensure_image()``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sparkd import imagerecipes  # noqa: E402
from sparkd.buildcontext import host_pip_ca  # noqa: E402
from sparkd.commands.images import build_recipe  # noqa: E402

RECIPE = "smollm2-cpu"
CONTEXT = REPO / "containerfiles" / RECIPE
IMAGE_REPO = "localhost/sparkd/smollm2-cpu"
IMAGE_LATEST = f"{IMAGE_REPO}:latest"
PODMAN_URL = os.environ.get("SPARKD_TEST_PODMAN_URL", "unix:///run/podman/podman.sock")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test"))


def log(msg: str) -> None:
    print(f"[cpu_demo] {msg}", flush=True)


def recipe() -> imagerecipes.Recipe:
    found = imagerecipes.recipe_named(RECIPE)
    assert found is not None
    return found


def context_digest() -> str:
    """Every file of the recipe directory, by path and content."""
    h = hashlib.sha256()
    for path in sorted(p for p in CONTEXT.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(CONTEXT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def image_hash() -> str:
    spec = {
        "context": context_digest(),
        "bases": sorted(base.tag() for base in recipe().debian_bases),
        # The final image does not hold the CA, but a build without one is another build.
        "pip_ca": host_pip_ca(os.environ) is not None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prune_stale(client: Any, keep: set[str]) -> None:
    """Drop this script's older tags (other hashes) and older bases of the recipe, but
    the newest other one of each repository: two checkouts on one machine (a branch and
    a merge of it) then do not delete each other's image and its layer cache.

    Not forced: an image a container still uses stays.
    """
    from podman.errors import APIError

    repositories = {IMAGE_REPO} | {tag.rsplit(":", 1)[0] for tag in keep}
    stale: dict[str, list[tuple[int, str]]] = {repository: [] for repository in repositories}
    for image in client.images.list():
        for ref in image.tags:
            repository = ref.rsplit(":", 1)[0]
            if repository in repositories and ref not in keep | {IMAGE_LATEST}:
                stale[repository].append((int(image.attrs.get("Created") or 0), ref))
    for refs in stale.values():
        for _, ref in sorted(refs)[:-1]:
            with contextlib.suppress(APIError):
                client.images.remove(ref)


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
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
    from podman import PodmanClient

    started = time.monotonic()
    ref = f"{IMAGE_REPO}:{image_hash()}"
    with PodmanClient(base_url=PODMAN_URL, timeout=None) as client:
        if not force and client.images.exists(ref):
            log(f"{ref} exists, nothing to build")
        else:
            if not build_recipe(client, recipe(), CONTEXT, {}, ref):
                raise RuntimeError(f"`sparkd images build {RECIPE}` (build_recipe) failed for {ref}: see its output above")
            log(f"time: {time.monotonic() - started:.1f}s; size {client.images.get(ref).attrs['Size'] / 1e6:.0f} MB")
            prune_stale(client, {ref} | {base.tag() for base in recipe().debian_bases})
        client.images.get(ref).tag(IMAGE_REPO, "latest")
    return ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild the image even if its tag exists")
    ap.add_argument("--print-tag", action="store_true", help="print the content-hash tag and exit")
    args = ap.parse_args()
    if args.print_tag:
        print(f"{IMAGE_REPO}:{image_hash()}")
        return 0
    print(ensure_image(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
