"""``sparkd doctor`` on this machine: Podman and the port pass; the missing GPU/CDI spec is reported with its fix."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from harness import free_port

pytestmark = pytest.mark.podman


def run_doctor(config_path):
    return subprocess.run([sys.executable, "-m", "sparkd", "doctor", "--config", str(config_path)], capture_output=True, text=True, check=False)


def test_doctor_reports_missing_cdi_spec_and_passes_podman_and_port(tmp_path, podman, engine_image):
    port = free_port()
    config = tmp_path / "sparkd.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "{tmp_path}"\n'
        '[models.gpu-model]\nimage = "localhost/sparkd/vllm-gb10:v1"\n'
        f'[models.cpu-model]\nimage = "{engine_image}"\ngpu = false\n'
    )
    result = run_doctor(config)
    out = result.stdout
    assert result.returncode == 1, out
    assert "PASS  podman" in out
    assert f"PASS  port       127.0.0.1:{port} is free" in out
    assert "FAIL  gpu" in out and "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in out
    assert "FAIL  image      localhost/sparkd/vllm-gb10:v1 is missing" in out and "sparkd images build vllm-gb10" in out
    assert f"PASS  image      {engine_image} is present" in out


def test_doctor_port_taken_by_another_program(tmp_path, podman, engine_image):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "sparkd.toml"
        config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "{tmp_path}"\n[models.m]\nimage = "{engine_image}"\ngpu = false\n')
        result = run_doctor(config)
    assert result.returncode == 1
    assert "is in use by another program" in result.stdout and "ss -ltnp" in result.stdout
