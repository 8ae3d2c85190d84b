"""What the layers of a Podman image hold, read from `podman image save` (podman-py).

Used to prove a build-time secret (the host's pip CA bundle) reached no layer of an image.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)\s+-----END CERTIFICATE-----", re.DOTALL)
IMAGE_CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"


def certificates(pem: bytes) -> set[bytes]:
    """The base64 bodies of a PEM bundle's certificates, line breaks removed."""
    return {re.sub(rb"\s+", b"", body) for body in PEM_BLOCK.findall(pem)}


@dataclass
class Layers:
    paths: set[str] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)
    files_read: int = 0
    image_ca_bundle: bytes = b""
    """The image's own /etc/ssl/certs/ca-certificates.crt (the last layer's that has one)."""
    hits: dict[bytes, list[str]] = field(default_factory=dict)
    """Needle -> paths of the files holding it."""


def scan(client: Any, image: str, tmp: Path, needles: set[bytes]) -> Layers:
    """Every regular file of every layer of ``image``: its path, its sha256, and which
    of ``needles`` (searched with line breaks removed) it contains."""
    archive = tmp / "image.tar"
    with archive.open("wb") as out:
        for chunk in client.images.get(image).save(named=False):
            out.write(chunk)
    found = Layers(hits={needle: [] for needle in needles})
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for layer_name in manifest[0]["Layers"]:
            layer_file = outer.extractfile(layer_name)
            assert layer_file is not None, layer_name
            with tarfile.open(fileobj=io.BytesIO(layer_file.read())) as layer:
                for member in layer:
                    path = member.name.removeprefix("./")
                    found.paths.add(path)
                    if not member.isfile():
                        continue
                    data = layer.extractfile(member).read()  # type: ignore[union-attr]
                    found.files_read += 1
                    found.digests.add(hashlib.sha256(data).hexdigest())
                    if path == IMAGE_CA_BUNDLE:
                        found.image_ca_bundle = data
                    if needles and b"-----BEGIN" in data:
                        flat = re.sub(rb"\s+", b"", data)
                        for needle in needles:
                            if needle in flat:
                                found.hits[needle].append(path)
    archive.unlink()
    return found


def assert_holds_no_ca(client: Any, image: str, ca_file: Path, tmp: Path) -> Layers:
    """No layer of ``image`` holds ``ca_file``, a file named like sparkd's build CA, or any
    certificate of ``ca_file`` that the image's own CA bundle does not have (a proxy's CA)."""
    bundle = ca_file.read_bytes()
    host_certificates = certificates(bundle)
    layers = scan(client, image, tmp, host_certificates)
    assert layers.files_read > 0, f"no file read from {image}'s layers"
    assert hashlib.sha256(bundle).hexdigest() not in layers.digests, f"{image} holds a copy of {ca_file}"
    carried = sorted(p for p in layers.paths if "pip-ca.pem" in p or p.startswith("build/ca"))
    assert not carried, f"{image} holds sparkd's build CA: {carried}"
    own = certificates(layers.image_ca_bundle)
    foreign = host_certificates - own
    leaked = {needle[:40]: paths for needle, paths in layers.hits.items() if needle in foreign and paths}
    assert not leaked, f"{image} holds certificates of {ca_file} that are not its own: {leaked}"
    return layers
