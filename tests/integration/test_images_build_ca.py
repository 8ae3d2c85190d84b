"""pip inside `sparkd images build` trusts the host's CA bundle, and no image keeps it (issue 12).

These machines reach PyPI through a TLS-inspecting proxy whose CA only the host trusts
(PIP_CERT, ...). Podman's API build cannot mount it, so sparkd builds from a temporary
copy of the recipe that holds the bundle in build-ca/, and the recipe COPYs it into its
builder stage only (sparkd/buildcontext.py).

A stand-in recipe (one pip download on the demo's runtime base, a few seconds) shows that
pip reaches PyPI through the CA handed over and that the final image holds none of it,
and that the same build without a CA fails, with advice; the demo image, built by
tests/images/cpu_demo.py through the same code, holds none of it either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from imagelayers import assert_holds_no_ca
from sparkd.buildcontext import CA_VARIABLES, host_pip_ca
from sparkd.imagerecipes import recipe_named

pytestmark = pytest.mark.podman

STAND_IN = """\
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${{BASE_IMAGE}} AS wheels
COPY build-ca/ /build/ca/
# The nonce makes it a new step every run, so pip really runs (no cached layer of an earlier run).
RUN : {nonce}; set -eu; if [ -s /build/ca/pip-ca.pem ]; then export PIP_CERT=/build/ca/pip-ca.pem; fi; \\
    python3 -m venv /opt/v && /opt/v/bin/pip download --retries 0 --timeout 30 --no-deps --dest /dl six==1.16.0
FROM ${{BASE_IMAGE}}
COPY --from=wheels /dl /dl
RUN ls /dl
"""


def host_ca() -> Path:
    ca = host_pip_ca(os.environ)
    if ca is None:
        pytest.skip(f"none of {', '.join(CA_VARIABLES)} is set here: no CA for pip to hand over")
    return ca.path


@pytest.fixture
def runtime_base(cpu_demo_image: str) -> str:
    """The demo's runtime base (made from the Debian mirror by the demo image's build)."""
    recipe = recipe_named("smollm2-cpu")
    assert recipe is not None
    return next(b.tag() for b in recipe.debian_bases if b.build_arg == "BASE_IMAGE")


def stand_in_recipes(tmp_path: Path) -> Path:
    recipes = tmp_path / "containerfiles"
    (recipes / "smollm2-cpu" / "build-ca").mkdir(parents=True)
    (recipes / "smollm2-cpu" / "build-ca" / ".keep").write_text("")
    (recipes / "smollm2-cpu" / "Containerfile").write_text(STAND_IN.format(nonce=uuid.uuid4().hex))
    return recipes


def build(tmp_path: Path, recipes: Path, tag: str, base: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sparkd", "images", "build", "smollm2-cpu", "--config", str(config),
         "--containerfiles", str(recipes), "--tag", tag, "--build-arg", f"BASE_IMAGE={base}"],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    print(result.stdout[-4000:], result.stderr[-2000:])
    return result


def test_pip_in_the_builder_stage_trusts_the_hosts_ca_and_the_image_keeps_none(
    tmp_path: Path, podman: Any, runtime_base: str
) -> None:
    ca = host_ca()
    recipes = stand_in_recipes(tmp_path)
    tag = f"localhost/sparkd-test/build-ca:{uuid.uuid4().hex[:8]}"
    try:
        result = build(tmp_path, recipes, tag, runtime_base, dict(os.environ))
        assert result.returncode == 0, result.stderr
        assert f"pip in the builder stage trusts {ca} (from " in result.stdout
        assert "Saved /dl/six-1.16.0" in result.stdout and f"built {tag}" in result.stdout
        # The recipe handed to the build is a copy: the recipe itself still holds only its placeholder.
        assert sorted(p.name for p in (recipes / "smollm2-cpu" / "build-ca").iterdir()) == [".keep"]
        layers = assert_holds_no_ca(podman, tag, ca, tmp_path)
        assert any(p.startswith("dl/six-1.16.0") for p in layers.paths), "the stand-in's download is not in its image"
    finally:
        if podman.images.exists(tag):
            podman.images.remove(tag, force=True)


def test_without_a_ca_pip_in_the_build_fails_and_the_error_says_what_to_set(
    tmp_path: Path, podman: Any, runtime_base: str
) -> None:
    host_ca()
    env = {k: v for k, v in os.environ.items() if k not in CA_VARIABLES}
    tag = f"localhost/sparkd-test/build-ca:{uuid.uuid4().hex[:8]}"
    try:
        result = build(tmp_path, stand_in_recipes(tmp_path), tag, runtime_base, env)
        if result.returncode == 0:
            pytest.skip("pip reached PyPI without the host's CA: no TLS-inspecting proxy here")
        assert "uses its own CA list (none of PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE is set)" in result.stdout
        assert "CERTIFICATE_VERIFY_FAILED" in result.stdout
        assert f"build of {tag} FAILED" in result.stderr
        assert "set PIP_CERT to the proxy's CA bundle" in result.stderr
    finally:
        if podman.images.exists(tag):
            podman.images.remove(tag, force=True)


def test_a_ca_setting_naming_no_file_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_CERT": str(tmp_path / "missing.pem")}
    result = build(tmp_path, stand_in_recipes(tmp_path), "localhost/sparkd-test/build-ca:never", "unused", env)
    assert result.returncode == 1
    assert f"PIP_CERT={tmp_path / 'missing.pem'} names nothing, not a CA bundle file" in result.stderr
    assert "point PIP_CERT at the bundle pip should trust" in result.stderr


def test_no_layer_of_the_demo_image_holds_the_hosts_ca(tmp_path: Path, podman: Any, cpu_demo_image: str) -> None:
    layers = assert_holds_no_ca(podman, cpu_demo_image, host_ca(), tmp_path)
    # The scan read the image: its model and its server are among the files.
    assert "models/SmolLM2-135M-Instruct.Q4_1.gguf" in layers.paths
    assert layers.image_ca_bundle, "the demo image has no CA bundle of its own: the foreign-certificate check saw nothing"
    print(f"scanned {layers.files_read} files of {cpu_demo_image}")
