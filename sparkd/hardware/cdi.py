"""Which CDI devices (e.g. ``nvidia.com/gpu=all``) this host can give a container."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SPEC_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


def known_devices() -> tuple[set[str], str]:
    """CDI device names Podman can resolve, and where they were read from (blocking: run in a thread)."""
    tool = shutil.which("nvidia-ctk")
    if tool:
        try:
            result = subprocess.run([tool, "cdi", "list"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0:
            return {line.strip() for line in result.stdout.splitlines() if "=" in line}, "nvidia-ctk cdi list"
    names: set[str] = set()
    for spec_dir in SPEC_DIRS:
        for spec in sorted(spec_dir.glob("*.y*ml")) + sorted(spec_dir.glob("*.json")):
            if "nvidia.com/gpu" in spec.read_text(errors="replace"):
                names.add("nvidia.com/gpu=all")
    return names, "CDI spec files in " + " and ".join(str(d) for d in SPEC_DIRS)
