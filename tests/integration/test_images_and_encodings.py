"""`sparkd images build` streams a real build through the Podman API; a model missing its encodings fails clearly."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman


def test_images_build_streams_the_build_through_podman(tmp_path, podman, engine_image):
    recipe = tmp_path / "containerfiles" / "vllm-gb10"
    recipe.mkdir(parents=True)
    # A stand-in recipe under the real recipe's name: the command, not the GB10 build, is under test.
    recipe.joinpath("Containerfile").write_text(f"FROM {engine_image}\nRUN echo building-step-visible\n")
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "localhost/sparkd/vllm-gb10:v1"\n')
    tag = "localhost/sparkd/vllm-gb10:v1"
    existed = podman.images.exists(tag)
    if existed:
        pytest.skip(f"{tag} exists on this machine (a real build): not overwriting it")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sparkd", "images", "build", "--config", str(config), "--containerfiles", str(recipe.parent)],
            capture_output=True,
            text=True,
            timeout=300, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "building-step-visible" in result.stdout  # the build's own output, streamed
        assert f"built {tag}" in result.stdout
        assert podman.images.exists(tag)
    finally:
        if podman.images.exists(tag):
            podman.images.remove(tag, force=True)


def test_images_build_reports_a_broken_recipe(tmp_path, podman):
    recipe = tmp_path / "containerfiles" / "smollm2-cpu"
    recipe.mkdir(parents=True)
    recipe.joinpath("Containerfile").write_text("FROM localhost/sparkd-no-such-base:1\n")
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sparkd", "images", "build", "smollm2-cpu", "--config", str(config), "--containerfiles", str(recipe.parent)],
        capture_output=True,
        text=True,
        timeout=300, check=False,
    )
    assert result.returncode == 1
    assert "build of localhost/sparkd/smollm2-cpu:latest FAILED" in result.stderr


async def test_missing_encodings_fail_before_the_container_starts(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"gptoss": engine_model(engine_image, encodings=True)})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "gptoss")
    assert status == 503
    message = body["error"]["message"]
    assert "cl100k_base.tiktoken does not exist" in message and "sparkd encodings fetch" in message
    assert not podman.containers.exists(sparkd.container("gptoss"))  # refused before anything was created
