"""What a valid value of some config fields looks like: names, listen addresses, volumes, sizes."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .validate import describe

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHM_SIZE = re.compile(r"^[0-9]+[kmgKMG]?$")
PEER_URL = re.compile(r"^https?://[^/\s]+")
KNOWN_ULIMITS = frozenset({"core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"})


def parse_listen(address: str) -> tuple[str, int]:
    """``host:port`` → (host, port); IPv6 hosts are written in brackets."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError("missing host or port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not within 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    return host, int(port_text)


def volume_error(volume: str) -> str | None:
    parts = volume.split(":")
    if len(parts) not in (2, 3):
        return "expected two or three ':'-separated parts"
    source, target = parts[0], parts[1]
    if not source:
        return "empty host path"
    if not target.startswith("/"):
        return "the container path must be absolute"
    if len(parts) == 3 and not set(parts[2].split(",")) <= {"ro", "rw", "z", "Z"}:
        return f"unknown option {parts[2]!r}"
    return None


def listen_error(address: str) -> str | None:
    """Why ``address`` is not a ``host:port`` sparkd can listen on, or None."""
    try:
        parse_listen(address)
    except ValueError as error:
        return str(error)
    return None


def ulimit_problem(name: str, value: Any) -> tuple[str, str] | None:
    """(expected, found) for a ``ulimits`` entry Podman would refuse, or None."""
    if name not in KNOWN_ULIMITS:
        return "one of " + ", ".join(sorted(KNOWN_ULIMITS)), f"unknown ulimit {name!r}"
    if value < -1:
        return "a limit >= 0, or -1 for unlimited", describe(value)
    return None
