"""Which of a model's mounts would hide files its image already holds.

A volume mounted at a container path replaces whatever the image has there: the
CPU demo image keeps its GGUF in /models, so a default `...:/models` volume left it
without a model. `sparkd check-config` asks Podman, for each enabled model, whether
each mount target exists in the image (a created, never started container and the
archive API: nothing runs, nothing is copied but a tar header or two).

Synchronous (podman-py): called from the command line, never from the event loop.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import Config, ModelConfig
from .spec import render

PROBE_LABEL = "io.sparkd.path-probe"
"""Label of the short-lived containers the check creates (never io.sparkd.managed)."""
GO_MODE_DIR = 1 << 31
"""The directory bit of Go's os.FileMode, as Podman's path-stat header carries it."""


@dataclass(frozen=True)
class HiddenPath:
    model: str
    image: str
    volume: str
    """The mount as configured (``host:container[:opts]``)."""
    path: str
    """The container path whose image content the mount hides."""
    what: str
    """``a file`` or ``a directory with files``."""


@dataclass(frozen=True)
class UncheckedImage:
    image: str
    models: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class MountReport:
    hidden: tuple[HiddenPath, ...]
    unchecked: tuple[UncheckedImage, ...]


def check_mounts(client: Any, config: Config, models: Iterable[ModelConfig]) -> MountReport:
    """Every mount of ``models`` that hides a file or a non-empty directory of its image."""
    by_image: dict[str, list[tuple[ModelConfig, list[tuple[str, str]]]]] = {}
    for model in models:
        mounts = [(_volume_text(m.source, m.target, m.read_only), m.target) for m in render(config, model).mounts]
        if mounts:
            by_image.setdefault(model.image, []).append((model, mounts))
    hidden: list[HiddenPath] = []
    unchecked: list[UncheckedImage] = []
    for image, users in by_image.items():
        names = tuple(m.name for m, _ in users)
        if not client.images.exists(image):
            unchecked.append(UncheckedImage(image, names, "the image is not present (build or pull it, then check again)"))
            continue
        try:
            container = client.containers.create(image, command=["true"], labels={PROBE_LABEL: "true"})
        except Exception as error:  # noqa: BLE001 - podman-py raises APIError and requests' errors alike
            unchecked.append(UncheckedImage(image, names, f"Podman could not create a container from it: {error}"))
            continue
        try:
            for model, mounts in users:
                for volume, target in mounts:
                    what = _content_at(client, container.id, target)
                    if what:
                        hidden.append(HiddenPath(model.name, image, volume, target, what))
        finally:
            container.remove(force=True)
    return MountReport(tuple(hidden), tuple(unchecked))


def _content_at(client: Any, container_id: str, path: str) -> str | None:
    """``a file`` / ``a directory with files`` when the image holds something at ``path``."""
    from podman import api

    response = client.api.get(f"/containers/{container_id}/archive", params={"path": path}, stream=True)
    try:
        if response.status_code == 404:
            return None
        response.raise_for_status()
        stat = api.decode_header(response.headers.get("x-docker-container-path-stat")) or {}
        if not int(stat.get("mode", 0)) & GO_MODE_DIR:
            return "a file"
        # The tar's first member is the directory itself; a second one means content.
        # Only the headers are read: the response is closed before any file's data.
        with tarfile.open(fileobj=response.raw, mode="r|") as archive:
            for index, _member in enumerate(archive):
                if index >= 1:
                    return "a directory with files"
        return None
    finally:
        response.close()


def _volume_text(source: str, target: str, read_only: bool) -> str:
    return f"{source}:{target}" + (":ro" if read_only else "")
