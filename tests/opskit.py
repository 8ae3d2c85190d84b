"""Helpers for the operator-experience tests: run sparkctl, read /metrics, drive headless Chromium.

The browser is Debian's ``chromium`` driven over the Chrome DevTools protocol
(``--remote-debugging-port``) with aiohttp's websocket client: no WebDriver, no
browser download, no extra Python dependency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from harness import REPO, Sparkd

CHROMIUM = os.environ.get("SPARKD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
]


def socket_path(sparkd: Sparkd) -> Path:
    return sparkd.workdir / "run" / "sparkd.sock"


async def ctl(sparkd: Sparkd, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``sparkctl --socket <the daemon's admin socket> ARGS``; (exit code, stdout, stderr)."""
    return await run_ctl("--socket", str(socket_path(sparkd)), *args, timeout=timeout, env=env)


async def run_ctl(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkd.ctl", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(f"sparkctl {' '.join(args)} did not finish in {timeout}s; stdout: {out.decode()[-2000:]}") from None
    return process.returncode or 0, out.decode(), err.decode()


class Ctl:
    """A long-running sparkctl (``logs -f``, ``top``) whose output is read as it comes."""

    def __init__(self, sparkd: Sparkd, *args: str) -> None:
        self.args = ["--socket", str(socket_path(sparkd)), *args]
        self.process: asyncio.subprocess.Process | None = None
        self.output = ""

    async def __aenter__(self) -> Ctl:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sparkd.ctl", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        return self

    async def wait_for(self, text: str, timeout: float = 20) -> str:
        """Read output until ``text`` appears; returns everything read so far."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not in sparkctl output after {timeout}s:\n{self.output[-3000:]}")
            try:
                chunk = await asyncio.wait_for(self.process.stdout.read(4096), remaining)
            except asyncio.TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"sparkctl ended before {text!r} appeared:\n{self.output[-3000:]}")
            self.output += chunk.decode("utf-8", "replace")
        return self.output

    async def __aexit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


async def metrics(sparkd: Sparkd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed with prometheus-client's parser: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    async with sparkd.admin_session() as session, session.get(sparkd.admin_url + "/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- headless Chromium over the DevTools protocol ----------------------------------------------


class Browser:
    """One headless Chromium with one page, driven over CDP."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="sparkd-chromium-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self.console: list[str] = []

    async def __aenter__(self) -> Browser:
        if not Path(CHROMIUM).exists():
            raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get install chromium (tests/setup/host.sh installs it)")
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port within 30 s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        targets: list[dict[str, Any]] = []
        while not any(t.get("type") == "page" for t in targets):
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            await asyncio.sleep(0.1)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._next_id += 1
        ident = self._next_id
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = await asyncio.wait_for(self.ws.receive(), 30)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed: {message.type}")
            data = json.loads(message.data)
            if data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in data["params"]["args"]))
            if data.get("id") == ident:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, expression: str, timeout: float = 20) -> Any:
        """Poll ``expression`` in the page until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
            except RuntimeError:
                last = None
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"page never satisfied {expression!r} within {timeout}s (last: {last!r}; console: {self.console[-5:]})")

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path
