"""``sparkd encodings fetch|check``: download and verify the GPT-OSS tiktoken files."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request

from .. import encodingfiles


def fetch(state_dir: str, source: str = encodingfiles.SOURCE_URL) -> int:
    target = encodingfiles.directory(state_dir)
    target.mkdir(parents=True, exist_ok=True)
    failures = 0
    for encoding in encodingfiles.ENCODINGS:
        path = target / encoding.file
        if path.is_file() and encodingfiles.sha256_of(path) == encoding.sha256:
            print(f"ok        {path} (already verified)")
            continue
        url = f"{source.rstrip('/')}/{encoding.file}"
        try:
            data = _download(url)
        except (urllib.error.URLError, OSError) as error:
            print(f"FAILED    {url}: {error}; check the network or pass --from a mirror", file=sys.stderr)
            failures += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != encoding.sha256:
            print(f"FAILED    {url}: SHA-256 {digest} is not the published {encoding.sha256}; nothing written", file=sys.stderr)
            failures += 1
            continue
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
        print(f"fetched   {path} ({len(data)} bytes, SHA-256 verified)")
    return 1 if failures else 0


def check(state_dir: str) -> int:
    found = encodingfiles.problems(state_dir)
    for problem in found:
        print(f"FAILED    {problem}: run `sparkd encodings fetch`", file=sys.stderr)
    if not found:
        print(f"ok        {encodingfiles.directory(state_dir)}: {len(encodingfiles.ENCODINGS)} encodings verified")
    return 1 if found else 0


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - https URL from config/CLI
        data: bytes = response.read()
    return data

