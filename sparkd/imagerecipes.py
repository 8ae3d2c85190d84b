"""The engine images sparkd knows how to build, and where their recipes live.

The recipes are the Containerfiles under ``containerfiles/`` (installed by the
package to /usr/share/sparkd/containerfiles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .localbase import DebianBase

INSTALLED_CONTAINERFILES = Path("/usr/share/sparkd/containerfiles")
SMOLLM2_RUNTIME_PACKAGES = ("python3", "python3-venv", "ca-certificates")


@dataclass(frozen=True)
class Recipe:
    name: str
    """Also the recipe's directory under containerfiles/."""
    image: str
    build_minutes: int
    description: str
    debian_bases: tuple[DebianBase, ...] = ()
    """Base images the recipe can also build on when made from a Debian mirror
    (localbase.py), for hosts no container registry answers."""


RECIPES = (
    Recipe("vllm-gb10", "localhost/sparkd/vllm-gb10:v1", 20, "general-purpose vLLM built for GB10 (compute capability 12.1)"),
    Recipe("vllm-gb10-mxfp4", "localhost/sparkd/vllm-gb10-mxfp4:v1", 20, "vLLM with MXFP4 kernels for GPT-OSS on GB10"),
    Recipe(
        "smollm2-cpu",
        "localhost/sparkd/smollm2-cpu:latest",
        10,
        "SmolLM2-135M on llama-cpp-python: the CPU demo model",
        debian_bases=(
            # What the Containerfile needs of its two FROM images (see its header).
            DebianBase("smollm2-runtime", "BASE_IMAGE", "docker.io/library/python:3.11-slim-bookworm", SMOLLM2_RUNTIME_PACKAGES),
            DebianBase(
                "smollm2-builder",
                "BUILDER_IMAGE",
                "docker.io/library/python:3.11-bookworm",
                (*SMOLLM2_RUNTIME_PACKAGES, "python3-dev", "build-essential", "cmake", "ninja-build"),
            ),
        ),
    ),
)


def recipe_for(image: str) -> Recipe | None:
    return next((r for r in RECIPES if r.image == image), None)


def recipe_named(name: str) -> Recipe | None:
    return next((r for r in RECIPES if r.name == name), None)


def containerfiles_dir() -> Path:
    """The installed recipes, or a checkout's (running from source), or $SPARKD_CONTAINERFILES."""
    override = os.environ.get("SPARKD_CONTAINERFILES")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parent.parent / "containerfiles"
    return checkout if checkout.is_dir() else INSTALLED_CONTAINERFILES
