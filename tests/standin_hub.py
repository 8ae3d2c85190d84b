"""A stand-in Hugging Face hub for the weights tests: the endpoints huggingface_hub calls, on loopback.

- ``GET /api/models/<org>/<name>[/revision/<rev>]``: the model info with its siblings and sizes;
- ``HEAD|GET /<org>/<name>/resolve/<rev>/<file>``: a file, with the ``X-Repo-Commit``, ``ETag``
  and ``Content-Length`` headers the client reads, and ``Range`` requests for resumed downloads.

``cut_after[file] = n`` makes every GET of that file send bytes up to offset ``n`` and then
drop the connection (a transfer interrupted mid-file); ``requests`` records what was asked,
``Range`` headers included, so a test can see a download resume where it stopped.
The repository's files are real files on disk (the real-vLLM test model's), plus small
decoys in formats vLLM does not need, which a pull must leave alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from harness import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_DIR_IN_IMAGE = "/opt/model/SmolLM2-135M-Instruct"
DECOYS = {"pytorch_model.bin": b"not the weights vLLM loads\n" * 100, "model.onnx": b"onnx export\n" * 100,
          "README.md": b"# tiny\n", "onnx/model.onnx": b"onnx again\n"}


def model_files(image: str, cache_root: Path) -> Path:
    """The real-vLLM test model's files, copied out of its image once (cached by the image's tag)."""
    target = cache_root / ("weights-hub-" + hashlib.sha256(image.encode()).hexdigest()[:12])
    if (target / ".complete").exists():
        return target
    subprocess.run(["rm", "-rf", str(target)], check=True)
    target.mkdir(parents=True)
    name = f"sparkd-test-hub-copy-{target.name}"
    subprocess.run(["podman", "rm", "-f", name], check=False, capture_output=True)
    subprocess.run(["podman", "create", "--name", name, image], check=True, capture_output=True)
    try:
        subprocess.run(["podman", "cp", f"{name}:{MODEL_DIR_IN_IMAGE}/.", str(target)], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rm", "-f", name], check=False, capture_output=True)
    for relative, content in DECOYS.items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).write_bytes(content)
    (target / ".complete").touch()
    return target


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StandInHub:
    repo: str
    root: Path
    cut_after: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, file or api path, Range header) of every request."""
    token: str | None = None
    """A gated repository: every request needs ``Authorization: Bearer <token>`` (else 401, as the hub answers)."""
    rate_bps: float | None = None
    """Bytes per second at most for a file's content (a transfer slow enough to watch its progress)."""
    port: int = field(default_factory=free_port)
    _runner: web.AppRunner | None = None
    _digests: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file() and p.name != ".complete")

    def digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = file_digest(self.root / name)
        return self._digests[name]

    def downloads(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of file ``name``."""
        return [rng for method, path, rng in self.requests if method == "GET" and path == name]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(f"/api/models/{self.repo}", self.model_info)
        app.router.add_get(f"/api/models/{self.repo}/revision/{{revision}}", self.model_info)
        app.router.add_get(f"/{self.repo}/resolve/{{revision}}/{{name:.+}}", self.resolve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def refused(self, request: web.Request) -> web.Response | None:
        if self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}":
            return None
        return web.json_response({"error": "Access to this model is restricted."}, status=401,
                                 headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"})

    async def model_info(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path, None))
        refused = self.refused(request)
        if refused is not None:
            return refused
        siblings = []
        for name in self.files():
            size = (self.root / name).stat().st_size
            sibling: dict[str, object] = {"rfilename": name, "size": size, "blobId": self.digest(name)[:40]}
            if name.endswith((".safetensors", ".bin", ".onnx")):
                sibling["lfs"] = {"sha256": self.digest(name), "size": size, "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response({"id": self.repo, "modelId": self.repo, "sha": COMMIT, "private": False,
                                  "gated": False, "siblings": siblings})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((request.method, name, request.headers.get("Range")))
        refused = self.refused(request)
        if refused is not None:
            return refused
        path = self.root / name
        if name not in self.files():
            return web.json_response({"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"})
        size = path.stat().st_size
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{self.digest(name)}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"][6:].split("-")[0])
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(size - start)})
        await response.prepare(request)
        stop = self.cut_after.get(name, size)
        with path.open("rb") as handle:
            handle.seek(start)
            offset = start
            while offset < size:
                if offset >= stop:
                    assert request.transport is not None
                    request.transport.abort()  # the connection drops mid-file
                    return response
                chunk = handle.read(min(1 << 20, stop - offset))
                await response.write(chunk)
                offset += len(chunk)
                if self.rate_bps:
                    await asyncio.sleep(len(chunk) / self.rate_bps)
        await response.write_eof()
        return response


def snapshot_file(cache: Path, repo: str, name: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT / name


def dump(data: object) -> str:
    return json.dumps(data, indent=1)[:3000]
