"""``sparkd images list|build``: build the engine images through the Podman API, with live output."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import imagerecipes
from ..buildcontext import (
    BuildContextError,
    PipCa,
    build_context,
    host_pip_ca,
    wants_pip_ca,
)
from ..config import Config
from ..localbase import BaseBuildError, ensure_base


def list_images(config: Config) -> int:
    from podman import PodmanClient

    users: dict[str, list[str]] = {}
    for model in config.enabled_models():
        users.setdefault(model.image, []).append(model.name)
    with PodmanClient(base_url=config.podman.url, timeout=30) as client:
        for recipe in imagerecipes.RECIPES:
            present = "present" if client.images.exists(recipe.image) else "missing"
            used = ", ".join(users.get(recipe.image, [])) or "no enabled model"
            print(f"{recipe.name:<16} {present:<8} {recipe.image}  ({recipe.description}; used by {used})")
    return 0


def build(config: Config, names: list[str], build_args: dict[str, str], directory: Path | None, tag: str | None = None) -> int:
    """Build each named recipe (default: those the enabled models need); ``tag`` builds
    the one named recipe under another image name (to try a changed recipe)."""
    from podman import PodmanClient

    recipes = [imagerecipes.recipe_named(n) for n in names] if names else _needed(config)
    unknown = [n for n, r in zip(names, recipes, strict=False) if r is None]
    if unknown:
        known = ", ".join(r.name for r in imagerecipes.RECIPES)
        print(f"unknown image recipe(s): {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    if not recipes:
        print("no enabled model uses an image sparkd builds; nothing to do")
        return 0
    if tag is not None and len(recipes) != 1:
        print(f"--tag names the image of one recipe; {len(recipes)} recipes were asked for: name one", file=sys.stderr)
        return 2
    root = directory or imagerecipes.containerfiles_dir()
    with PodmanClient(base_url=config.podman.url, timeout=None) as client:
        for recipe in recipes:
            assert recipe is not None
            if not build_recipe(client, recipe, root / recipe.name, build_args, tag or recipe.image):
                return 1
    return 0


def _needed(config: Config) -> list[imagerecipes.Recipe | None]:
    needed = {m.image for m in config.enabled_models()}
    return [r for r in imagerecipes.RECIPES if r.image in needed]


def _bases_from_a_mirror(client: Any, recipe: imagerecipes.Recipe, containerfile: Path, build_args: dict[str, str]) -> dict[str, str]:
    """Build arguments naming Debian bases made locally, for each base the recipe would
    pull from a registry that does not answer (none given with --build-arg, none present)."""
    declared = set(re.findall(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)", containerfile.read_text(), re.MULTILINE))
    chosen: dict[str, str] = {}
    for base in recipe.debian_bases:
        if base.build_arg not in declared or base.build_arg in build_args or client.images.exists(base.registry_image):
            continue
        if client.images.exists(base.tag()):
            print(f"{base.registry_image} is not here: using {base.tag()}, made earlier from the Debian mirror", flush=True)
            chosen[base.build_arg] = base.tag()
            continue
        print(f"pulling {base.registry_image} (the recipe's {base.build_arg})", flush=True)
        failure = _pull(client, base.registry_image)
        if failure is None:
            continue
        print(f"could not pull {base.registry_image} ({failure}): making an equivalent Debian base from the package mirror instead", flush=True)
        chosen[base.build_arg] = ensure_base(client, base)
    return chosen


def _pull(client: Any, image: str) -> str | None:
    """None once ``image`` is pulled, else why not (podman-py's pull() reports no error)."""
    response = client.api.post("/images/pull", params={"reference": image, "quiet": "true"}, stream=True)
    error = None
    for line in response.iter_lines():
        if line:
            error = json.loads(line).get("error") or error
    if response.status_code >= 400 and error is None:
        error = response.text[:300] or f"HTTP {response.status_code}"
    if error is None and not client.images.exists(image):
        error = "Podman reported no error, but the image is not there"
    return None if error is None else str(error).strip().splitlines()[0][:300]


def build_recipe(
    client: Any,
    recipe: imagerecipes.Recipe,
    recipe_dir: Path,
    build_args: dict[str, str],
    image: str,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Build ``recipe`` from ``recipe_dir`` as ``image`` through the Podman API, bases
    made from the Debian mirror where no registry serves them, pip trusting the host's
    CA bundle in the recipe's builder stage (buildcontext.py). What `sparkd images
    build` runs for each recipe."""
    if not (recipe_dir / "Containerfile").is_file():
        print(f"{recipe_dir}/Containerfile not found: pass --containerfiles DIR (a checkout's containerfiles/)", file=sys.stderr)
        return False
    try:
        ca = host_pip_ca(environ) if wants_pip_ca(recipe_dir) else None
        build_args = {**_bases_from_a_mirror(client, recipe, recipe_dir / "Containerfile", build_args), **build_args}
        with build_context(recipe_dir, ca) as context:
            _say_which_ca(recipe_dir, ca)
            return _build_context(client, recipe, recipe_dir, context, build_args, image)
    except (BaseBuildError, BuildContextError) as error:
        print(f"cannot build {image}: {error}", file=sys.stderr)
        return False


def _say_which_ca(recipe_dir: Path, ca: PipCa | None) -> None:
    if ca is not None:
        print(f"pip in the builder stage trusts {ca.path} (from {ca.variable}); it is not copied into the image", flush=True)
    elif wants_pip_ca(recipe_dir):
        print("pip in the builder stage uses its own CA list (none of PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE is set)", flush=True)


def _build_context(
    client: Any, recipe: imagerecipes.Recipe, recipe_dir: Path, context: Path, build_args: dict[str, str], image: str
) -> bool:
    from podman import api

    print(f"building {image} from {recipe_dir} (usually about {recipe.build_minutes} min)", flush=True)
    started = time.monotonic()
    # outputformat is `podman build`'s default; without it Podman 4.3's API build never
    # reuses a cached layer (measured: every build recompiled everything).
    params = {
        "t": image,
        "dockerfile": "Containerfile",
        "rm": "true",
        "layers": "true",
        "outputformat": "application/vnd.oci.image.manifest.v1+json",
    }
    if build_args:
        params["buildargs"] = json.dumps(build_args)
    context_tar = api.create_tar(str(context))
    # podman-py's images.build() reads the whole build log before returning; the
    # raw API call streams it, so the operator sees each step as it runs.
    response = client.api.post(
        "/build", params=params, data=context_tar, headers={"Content-type": "application/x-tar"}, stream=True
    )
    failed = None
    untrusted = False
    for line in response.iter_lines():
        if not line:
            continue
        message = json.loads(line)
        if "stream" in message:
            sys.stdout.write(message["stream"])
            sys.stdout.flush()
            untrusted = untrusted or "CERTIFICATE_VERIFY_FAILED" in message["stream"]
        if "error" in message:
            failed = message["error"]
    context_tar.close()
    minutes = (time.monotonic() - started) / 60
    if failed or response.status_code >= 400:
        print(f"\nbuild of {image} FAILED after {minutes:.1f} min: {failed or response.text[:500]}", file=sys.stderr)
        if "nvcr.io" in str(failed):
            print("the base image is on NVIDIA NGC: run `podman login nvcr.io` first (see containerfiles/README.md)", file=sys.stderr)
        if untrusted:
            print(
                "pip in the build could not verify a server's certificate: behind a TLS-inspecting proxy set PIP_CERT "
                "to the proxy's CA bundle (under sudo: `sudo PIP_CERT=/path/to/bundle.pem sparkd images build ...`)",
                file=sys.stderr,
            )
        return False
    print(f"built {image} in {minutes:.1f} min", flush=True)
    return True
