"""Run a real sparkd daemon against real Podman for integration tests.

``Sparkd`` writes a configuration into a temporary directory, starts
``python -m sparkd serve`` as a child process (its own state and runtime
directories, its own port), waits for /readyz, and offers small helpers to call
it.  Every test gets a unique model-name prefix, so containers never collide
and are cleaned up by label afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import aiohttp

PODMAN_URL = os.environ.get("SPARKD_TEST_PODMAN_URL", "unix:///run/podman/podman.sock")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(document: dict[str, Any]) -> str:
    """TOML for ``{section: {key: value}}`` plus ``{"models": {name: {key: value}}}``."""
    lines: list[str] = []
    for section, body in document.items():
        tables = body.items() if section == "models" else [(None, body)]
        for name, table in tables:
            lines.append(f"[{section}]" if name is None else f"[models.{json.dumps(name)}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


def engine_model(
    image: str,
    *,
    claim: float = 0.0,
    lifecycle: str = "normal",
    sleep: bool = False,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A model table backed by the fake engine; knobs go in as ``env`` (``FAKE_LOAD_DELAY`` ...)."""
    table: dict[str, Any] = {
        "image": image,
        # "{name}" becomes the model's real (prefixed) name when the config is written.
        "args": ["--port", "8000", "--served-model-name", "{name}"] + (["--enable-sleep-mode"] if sleep else []) + list(args or []),
        "gpu": False,
        "gpu_memory": claim,
        "lifecycle": lifecycle,
        "env": dict(env or {}),
    }
    if sleep:
        table["sleep_mode"] = True
    table.update(extra)
    return table


class Sparkd:
    """One sparkd daemon process under test."""

    def __init__(self, workdir: Path, prefix: str, models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.prefix = prefix
        self.port = free_port()
        self.config_path = workdir / "sparkd.toml"
        self.log_path = workdir / "sparkd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = settings or {}
        self.admin_key: str | None = None
        """Sent to the admin API by ``status()`` when a test configures keys."""
        self.models = models
        self.write_config()

    def model(self, key: str) -> str:
        """The real (prefixed) name of the test's model ``key``."""
        return f"{self.prefix}-{key}"

    def container(self, key: str) -> str:
        return f"sparkd-{self.prefix}-{self.model(key)}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def document(self) -> dict[str, Any]:
        settings = {section: dict(values) for section, values in self.settings.items()}
        server = settings.setdefault("server", {})
        server.setdefault("listen", [f"127.0.0.1:{self.port}"])
        server.setdefault("state_dir", str(self.workdir / "state"))
        server.setdefault("runtime_dir", str(self.workdir / "run"))
        server.setdefault("shutdown_grace_s", 10)
        server.setdefault("instance", self.prefix)  # concurrent test daemons never touch each other
        # Keyless from loopback unless a test configures keys (see write_keys).
        server.setdefault("keys_file", str(self.workdir / "keys.toml"))
        server.setdefault("anonymous", "loopback")
        settings.setdefault("log", {}).setdefault("format", "console")
        settings["log"].setdefault("level", "debug")
        settings.setdefault("gpu", {}).setdefault("devices", [])
        defaults = settings.setdefault("defaults", {})
        # Concurrent test daemons each allocate engine ports from a range of their own.
        base = 20000 + (zlib.crc32((self.prefix + str(self.workdir)).encode()) % 450) * 20
        defaults.setdefault("port_range", [base, base + 19])
        defaults.setdefault("shm_size", "64m")
        defaults.setdefault("ulimits", {})
        lifecycle = settings.setdefault("lifecycle", {})
        lifecycle.setdefault("min_uptime_s", 0)
        lifecycle.setdefault("failure_backoff_s", 0)
        models = {}
        for key, table in self.models.items():
            name = self.model(key)
            table = json.loads(json.dumps(table))
            if "args" in table:
                table["args"] = [name if arg == "{name}" else arg for arg in table["args"]]
            models[name] = table
        return {**settings, "models": models}

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.document()))

    async def start(self, wait: bool = True, env: dict[str, str] | None = None, timeout: float = 30) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sparkd", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()
        if wait:
            await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"sparkd exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
                try:
                    async with session.get(self.base_url + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"sparkd not ready after {timeout}s:\n{self.logs()[-3000:]}")

    async def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def add_user_key(self) -> str:
        """Write a user key into the daemon's default keys file (before ``start``) and return it.

        For clients that must send some key (the OpenAI SDK): a key not in the file is a 401, even keyless-allowed.
        """
        key = f"sk-test-user-{uuid.uuid4().hex}"
        write_keys(Path(self.document()["server"]["keys_file"]), {"test-user": {"key": key}})
        return key

    @property
    def socket_path(self) -> Path:
        """The admin unix socket: the only keyless way to the admin API."""
        return Path(self.document()["server"]["runtime_dir"]) / "sparkd.sock"

    def admin_session(self) -> aiohttp.ClientSession:
        """A session for ``admin_url``: the admin key over TCP when the test set one, else the unix admin socket."""
        if self.admin_key:
            return aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.admin_key}"})
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket_path)))

    @property
    def admin_url(self) -> str:
        return self.base_url if self.admin_key else "http://sparkd"

    async def admin(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Call the admin API (see ``admin_session``); (status, JSON body)."""
        async with self.admin_session() as session:
            async with session.request(method, self.admin_url + path, **kwargs) as response:
                return response.status, await response.json(content_type=None)

    async def status(self) -> dict[str, Any]:
        status, body = await self.admin("GET", "/api/status")
        assert status == 200, body
        return body

    async def model_status(self, key: str) -> dict[str, Any]:
        status = await self.status()
        return next(m for m in status["models"] if m["name"] == self.model(key))

    async def wait_state(self, key: str, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        current: dict[str, Any] = {}
        while time.monotonic() < deadline:
            current = await self.model_status(key)
            if current["state"] == state:
                return current
            await asyncio.sleep(0.05)
        raise TimeoutError(f"model {key} is {current.get('state')}, not {state}, after {timeout}s")

    async def chat(self, session: aiohttp.ClientSession, key: str, text: str = "hello", **fields: Any) -> tuple[int, Any]:
        body = {"model": self.model(key), "messages": [{"role": "user", "content": text}], **fields}
        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        async with session.post(self.base_url + "/v1/chat/completions", json=body, headers=headers) as response:
            payload = await response.json(content_type=None)
            return response.status, payload


def write_keys(path: Path, keys: dict[str, dict[str, Any]], mode: int = 0o600) -> None:
    """A keys file: ``{name: {"key": ..., "role": ..., "models": [...]}}``, owner-only by default."""
    lines = []
    for name, table in keys.items():
        lines.append(f"[keys.{json.dumps(name)}]")
        lines.extend(f"{field} = {toml_value(value)}" for field, value in table.items())
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(mode)


def unique_prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]


def run_async(coroutine: Any) -> Any:
    """Run a coroutine from a synchronous (module-scoped) fixture or test on a loop of its own."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def remove_containers(client: Any, prefix: str) -> None:
    """Remove every container of the test's models (label io.sparkd.model=<prefix>-*)."""
    for container in client.containers.list(all=True, filters={"label": "io.sparkd.managed=true"}):
        model = (container.labels or {}).get("io.sparkd.model", "")
        if model.startswith(prefix + "-"):
            with contextlib.suppress(Exception):  # best-effort cleanup
                container.remove(force=True)


def container_events(client: Any, since: float, prefix: str, actions: set[str] | None = None) -> list[tuple[float, str, str]]:
    """Podman events of the test's containers since ``since``: (time, action, model)."""
    events = []
    for raw in client.events(since=int(since) - 1, until=int(time.time()) + 1, filters={"label": "io.sparkd.managed=true"}, decode=True):
        if raw.get("Type") != "container":
            continue
        attributes = (raw.get("Actor") or {}).get("Attributes") or {}
        model = attributes.get("io.sparkd.model", "")
        action = raw.get("Action") or raw.get("status")
        stamp = (raw.get("timeNano") or 0) / 1e9 or float(raw.get("time", 0))
        if model.startswith(prefix + "-") and stamp >= since and (actions is None or action in actions):
            events.append((stamp, action, model))
    return sorted(events)
