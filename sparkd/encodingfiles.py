"""The tiktoken encodings GPT-OSS models need (vLLM reads them from TIKTOKEN_ENCODINGS_BASE).

vLLM's GPT-OSS support downloads these files at start-up unless they are given
locally; on an offline box that fails, which is why the seed mounted them by
hand.  sparkd keeps them in ``<state_dir>/encodings`` and mounts them read-only
into the models whose config says ``encodings = true``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

SOURCE_URL = "https://openaipublic.blob.core.windows.net/encodings"
CONTAINER_DIR = "/etc/encodings"
ENV = "TIKTOKEN_ENCODINGS_BASE"


@dataclass(frozen=True)
class Encoding:
    file: str
    sha256: str


# The hashes tiktoken itself checks these files against (tiktoken_ext/openai_public.py).
ENCODINGS = (
    Encoding("cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    Encoding("o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
)


def directory(state_dir: str) -> Path:
    return Path(state_dir) / "encodings"


def problems(state_dir: str) -> list[str]:
    """What is wrong with the stored encodings (empty when all are present and verified)."""
    found = []
    for encoding in ENCODINGS:
        path = directory(state_dir) / encoding.file
        if not path.is_file():
            found.append(f"{path} is missing")
        elif sha256_of(path) != encoding.sha256:
            found.append(f"{path} does not match its published SHA-256 (corrupt or truncated download)")
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
