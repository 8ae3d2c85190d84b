"""`sparkd check-config` warns when a model's mount hides files of its image (issue 12).

Real Podman, real images: the CPU demo image (its GGUF lives in /models) and the
fake engine image (a file at /opt/fake_vllm.py, nothing at /data). The check
creates a container it never starts, reads path headers through the archive API,
and removes the container again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import PODMAN_URL, REPO

pytestmark = pytest.mark.podman

PROBE_LABEL = "io.sparkd.path-probe=true"


def write_config(tmp_path: Path, models: str, defaults_volumes: str = "[]") -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(
        f'[podman]\nurl = "{PODMAN_URL}"\n'
        f'[gpu]\ndevices = []\n'
        f"[defaults]\nvolumes = {defaults_volumes}\n" + models
    )
    return path


def check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparkd", "check-config", "--config", str(path), *extra],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )


def probe_containers(podman: Any) -> list[Any]:
    return podman.containers.list(all=True, filters={"label": PROBE_LABEL})


def test_a_default_volume_over_the_demo_images_models_is_named(tmp_path: Path, podman: Any, cpu_demo_image: str) -> None:
    host = tmp_path / "models"
    config = write_config(
        tmp_path,
        f'[models.demo]\nimage = "{cpu_demo_image}"\ngpu = false\n',
        defaults_volumes=f'["{host}:/models"]',
    )
    result = check_config(config)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(warning) == 1, result.stdout
    assert "model demo" in warning[0]
    assert f"'{host}:/models'" in warning[0]
    assert "hides /models, which holds a directory with files" in warning[0]
    assert "skip_default_volumes = ['/models']" in warning[0]
    assert not host.exists(), "the check must not create host directories"
    assert probe_containers(podman) == []


def test_the_shipped_demo_model_hides_nothing(tmp_path: Path, podman: Any, cpu_demo_image: str) -> None:
    # The shipped [defaults] volumes and the shipped demo table (skip_default_volumes), with the built image.
    shipped = (REPO / "etc" / "sparkd.toml").read_text()
    shipped = shipped.replace('image = "localhost/sparkd/smollm2-cpu:latest"', f'image = "{cpu_demo_image}"')
    shipped = shipped.replace('url = "unix:///run/podman/podman.sock"', f'url = "{PODMAN_URL}"')
    config = tmp_path / "sparkd.toml"
    config.write_text(shipped)
    result = check_config(config)
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "OK: 1 models" in result.stdout
    assert "warning:" not in result.stdout
    assert probe_containers(podman) == []


def test_a_file_is_named_and_absent_paths_pass(tmp_path: Path, podman: Any, engine_image: str) -> None:
    data = tmp_path / "data"
    script = tmp_path / "fake.py"
    config = write_config(
        tmp_path,
        f'[models.engine]\nimage = "{engine_image}"\ngpu = false\n'
        f'volumes = ["{data}:/data", "{script}:/opt/fake_vllm.py:ro"]\n',
    )
    result = check_config(config)
    print(result.stdout)
    warnings = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1, result.stdout
    assert f"volume '{script}:/opt/fake_vllm.py:ro' hides /opt/fake_vllm.py, which holds a file" in warnings[0]
    assert probe_containers(podman) == []


def test_an_absent_image_is_reported_as_unchecked(tmp_path: Path, podman: Any) -> None:
    config = write_config(
        tmp_path,
        '[models.ghost]\nimage = "localhost/sparkd-test/no-such-image:none"\ngpu = false\nvolumes = ["/srv/x:/models"]\n',
    )
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    assert "could not check the mounts of ghost against localhost/sparkd-test/no-such-image:none: the image is not present" in result.stdout
    assert "warning:" not in result.stdout
