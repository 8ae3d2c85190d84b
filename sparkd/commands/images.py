"""``sparkd images list|build``: build the engine images through the Podman API, with live output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import images
from ..config import Config


def list_images(config: Config) -> int:
    from podman import PodmanClient

    users: dict[str, list[str]] = {}
    for model in config.enabled_models():
        users.setdefault(model.image, []).append(model.name)
    with PodmanClient(base_url=config.podman.url, timeout=30) as client:
        for recipe in images.RECIPES:
            present = "present" if client.images.exists(recipe.image) else "missing"
            used = ", ".join(users.get(recipe.image, [])) or "no enabled model"
            print(f"{recipe.name:<16} {present:<8} {recipe.image}  ({recipe.description}; used by {used})")
    return 0


def build(config: Config, names: list[str], build_args: dict[str, str], directory: Path | None) -> int:
    """Build each named recipe (default: those the enabled models need)."""
    from podman import PodmanClient

    recipes = [images.recipe_named(n) for n in names] if names else _needed(config)
    unknown = [n for n, r in zip(names, recipes) if r is None]
    if unknown:
        known = ", ".join(r.name for r in images.RECIPES)
        print(f"unknown image recipe(s): {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    if not recipes:
        print("no enabled model uses an image sparkd builds; nothing to do")
        return 0
    root = directory or images.containerfiles_dir()
    with PodmanClient(base_url=config.podman.url, timeout=None) as client:
        for recipe in recipes:
            assert recipe is not None
            if not _build_one(client, recipe, root / recipe.name, build_args):
                return 1
    return 0


def _needed(config: Config) -> list[images.Recipe | None]:
    needed = {m.image for m in config.enabled_models()}
    return [r for r in images.RECIPES if r.image in needed]


def _build_one(client: object, recipe: images.Recipe, context: Path, build_args: dict[str, str]) -> bool:
    from podman import api

    if not (context / "Containerfile").is_file():
        print(f"{context}/Containerfile not found: pass --containerfiles DIR (a checkout's containerfiles/)", file=sys.stderr)
        return False
    print(f"building {recipe.image} from {context} (usually about {recipe.build_minutes} min)", flush=True)
    started = time.monotonic()
    params = {"t": recipe.image, "dockerfile": "Containerfile", "rm": "true", "layers": "true"}
    if build_args:
        params["buildargs"] = json.dumps(build_args)
    context_tar = api.create_tar(str(context))
    # podman-py's images.build() reads the whole build log before returning; the
    # raw API call streams it, so the operator sees each step as it runs.
    response = client.api.post(  # type: ignore[attr-defined]
        "/build", params=params, data=context_tar, headers={"Content-type": "application/x-tar"}, stream=True
    )
    failed = None
    for line in response.iter_lines():
        if not line:
            continue
        message = json.loads(line)
        if "stream" in message:
            sys.stdout.write(message["stream"])
            sys.stdout.flush()
        if "error" in message:
            failed = message["error"]
    context_tar.close()
    minutes = (time.monotonic() - started) / 60
    if failed or response.status_code >= 400:
        print(f"\nbuild of {recipe.image} FAILED after {minutes:.1f} min: {failed or response.text[:500]}", file=sys.stderr)
        if "nvcr.io" in str(failed):
            print("the base image is on NVIDIA NGC: run `podman login nvcr.io` first (see containerfiles/README.md)", file=sys.stderr)
        return False
    print(f"built {recipe.image} in {minutes:.1f} min", flush=True)
    return True
