"""Podman failures as precise errors: what failed, why, and what to do next."""

from __future__ import annotations

import requests
from podman.errors import APIError, ImageNotFound, NotFound


class RuntimeFailure(Exception):
    """A container operation failed.  ``str()`` is a message fit for a user."""

    needs_operator = False
    """Retrying cannot fix it: someone must change the host or the configuration (the message says how)."""
    code = "model_failed"
    """The error code a client gets for a model that failed this way."""


class PodmanUnreachable(RuntimeFailure):
    pass


class ImageMissing(RuntimeFailure):
    needs_operator = True
    code = "image_missing"


class DeviceMissing(RuntimeFailure):
    """Podman does not know the GPU device (no CDI spec)."""

    needs_operator = True
    code = "gpu_device_missing"


class VolumeSourceMissing(RuntimeFailure):
    """A read-only volume's host source does not exist (it is data the operator provides)."""

    needs_operator = True
    code = "volume_source_missing"


class EncodingsMissing(VolumeSourceMissing):
    """The tiktoken encodings a model mounts were never fetched."""

    code = "encodings_missing"


class ContainerNotFound(RuntimeFailure):
    pass


class PortInUse(RuntimeFailure):
    pass


def translate(error: Exception, *, action: str, url: str, name: str = "", image: str = "") -> RuntimeFailure:
    """Turn a podman-py / requests exception into a ``RuntimeFailure`` with advice."""
    if isinstance(error, RuntimeFailure):
        return error
    text = _explanation(error)
    if isinstance(error, (requests.exceptions.ConnectionError, FileNotFoundError, ConnectionRefusedError)):
        return PodmanUnreachable(
            f"cannot reach Podman at {url} to {action}: {text}. "
            "Is the Podman API socket running? Start it with `systemctl enable --now podman.socket` "
            "or check [podman] url in sparkd.toml"
        )
    if isinstance(error, requests.exceptions.Timeout):
        return PodmanUnreachable(f"Podman at {url} did not answer in time to {action}: {text}")
    lowered = text.lower()
    if isinstance(error, ImageNotFound) or "image not known" in lowered or "no such image" in lowered:
        return ImageMissing(
            f"image {image or '?'} not found in Podman's local storage: build it with "
            f"`sparkd images build` (see containerfiles/README.md) or pull it with `podman pull {image}`"
        )
    if "unresolvable cdi devices" in lowered or ("cdi" in lowered and "device" in lowered):
        return DeviceMissing(
            f"cannot {action}: Podman does not know the GPU device ({text}). Generate the NVIDIA CDI spec "
            "with `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` (check with `nvidia-ctk cdi list`), "
            "or set gpu = false for a CPU-only model"
        )
    if "address already in use" in lowered or "port is already allocated" in lowered:
        return PortInUse(
            f"cannot {action}: its host port is already in use ({text}). Free the port or give the model another "
            "`port` (or change defaults.port_range)"
        )
    if isinstance(error, NotFound):
        return ContainerNotFound(f"cannot {action}: container {name} does not exist ({text})")
    if isinstance(error, APIError):
        return RuntimeFailure(f"Podman refused to {action}: {text}")
    return RuntimeFailure(f"cannot {action}: {type(error).__name__}: {text}")


def _explanation(error: Exception) -> str:
    explanation = getattr(error, "explanation", None)
    if explanation:
        return str(explanation).strip()
    return str(error).strip() or type(error).__name__
