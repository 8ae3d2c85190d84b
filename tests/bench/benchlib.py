"""Shared pieces of the benchmark suite: a daemon under test, /proc readers, statistics, the load generator.

The benchmarks reuse the integration-test harness (``tests/harness.py``): a real
``python -m sparkd serve`` process against real Podman and the fake engine image.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness import PODMAN_URL, REPO, Sparkd, container_events, remove_containers, unique_prefix  # noqa: E402

BENCH_KEY = "sk-sparkd-bench-" + "0123456789abcdef" * 2
"""The client key the proxy benchmark sends, so sparkd's key check is part of what is measured."""


class BenchSparkd(Sparkd):
    """The harness's daemon, optionally run from another copy of the sources (``run.py --rev``)."""

    source: Path | None = None
    client_headers: ClassVar[dict[str, str]] = {"Authorization": f"Bearer {BENCH_KEY}"}
    """Headers of the measured client requests: a real client key."""

    async def start(self, wait: bool = True, env: dict[str, str] | None = None, timeout: float = 30) -> None:
        if self.source is None:
            await super().start(wait=wait, env=env, timeout=timeout)
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sparkd", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.source,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if wait:
            await self.wait_ready(timeout)


def export_sources(rev: str) -> tuple[Path, str]:
    """``git archive`` of sparkd/ at ``rev`` into a temporary directory: (directory, commit)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", rev + "^{commit}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"sparkd-src-{commit[:10]}-"))
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit, "sparkd"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise RuntimeError(f"git archive {commit} failed")
    return target, commit


def sources_of(rev: str) -> tuple[Path, str]:
    """A directory holding a sparkd/ package, or a git revision exported into one: (directory, what it is)."""
    if (Path(rev) / "sparkd" / "__main__.py").exists():
        return Path(rev).resolve(), f"the sparkd package in {Path(rev).resolve()}"
    source, commit = export_sources(rev)
    return source, f"commit {commit[:10]} ({rev})"


def describe_sources() -> str:
    """Which sparkd the daemons run: HEAD's commit, and whether sparkd/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "sparkd"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "the working tree (no git information)"
    return f"the working tree at {head}" + (f" with uncommitted changes in sparkd/ ({len(dirty.splitlines())} files)" if dirty else "")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- results


@dataclass
class Result:
    name: str
    value: float
    unit: str

    def line(self) -> str:
        if self.unit == "count":
            shown = f"{int(self.value)}"
        elif abs(self.value) >= 100:
            shown = f"{self.value:.0f}"
        else:
            shown = f"{self.value:.3f}"
        return f"RESULT {self.name} {shown} {self.unit}"


@dataclass
class Bench:
    """What one benchmark run shares: the Podman client, the engine image, a work directory."""

    podman: Any
    image: str
    workdir: Path
    podman_url: str = PODMAN_URL
    profile_dir: Path | None = None
    source: Path | None = None
    """Run the daemons from this copy of the sources (``run.py --rev``); None = the working tree."""
    uvloop: bool = False
    """Run the daemons under test on uvloop (an experiment: tests/bench/uvloop_site)."""
    compare_source: Path | None = None
    """``run.py --compare``: the sources of a second daemon the proxy benchmark streams through too."""
    compare_label: str = ""
    tracemalloc_frames: int = 0
    """``run.py --tracemalloc``: the soak benchmark traces sparkd's allocations with this many frames (0 = off)."""
    daemons: list[Sparkd] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def sparkd(self, name: str, models: dict[str, dict[str, Any]], settings: dict[str, Any] | None = None,
                     source: Path | None = None, env: dict[str, str] | None = None) -> AsyncIterator[Sparkd]:
        """A started daemon with production-like logging (info); stopped and cleaned up afterwards.

        ``env`` is added to the daemon's environment (a ``PYTHONPATH`` in it goes before --uvloop's).
        """
        prefix = unique_prefix()
        self.prefixes.append(prefix)
        merged: dict[str, Any] = {
            # JSON lines carry microsecond timestamps: timelines of state changes (sparkd_events).
            "log": {"level": "info", "format": "json"},
            # A benchmark daemon must never idle-stop a model in the middle of a phase.
            "lifecycle": {"idle_stop_s": 3600, "min_uptime_s": 0, "failure_backoff_s": 0},
            # The measured requests carry BENCH_KEY (see client_headers); the harness's own calls
            # (status, admin) go keyless over the unix admin socket.
            "server": {"anonymous": "loopback"},
            "podman": {"url": self.podman_url},
            # Away from the test suite's default range (18000-...): the test suite may run meanwhile.
            "defaults": {"port_range": [29000, 29499]},
        }
        for section, values in (settings or {}).items():
            merged.setdefault(section, {}).update(values)
        workdir = self.workdir / f"{name}-{prefix}"
        merged["server"].setdefault("keys_file", str(workdir / "keys.toml"))
        daemon = BenchSparkd(workdir, prefix, models, merged)
        daemon.source = source or self.source
        write_keys = getattr(sys.modules["harness"], "write_keys", None)
        if write_keys is not None:
            write_keys(Path(merged["server"]["keys_file"]), {"bench": {"key": BENCH_KEY, "role": "user"}})
        self.daemons.append(daemon)
        env = dict(env or {})
        if self.uvloop:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(HERE / "uvloop_site")]))
        await daemon.start(timeout=60, env=env or None)
        try:
            yield daemon
        finally:
            try:
                await daemon.stop(timeout=30)
            except Exception:  # noqa: BLE001 - a benchmark's cleanup must not hide its figures
                daemon.kill()
            await asyncio.to_thread(remove_containers, self.podman, prefix)


async def first_event(bench: Bench, sparkd: Sparkd, key: str, action: str, since: float) -> tuple[float, list[tuple[float, str, str]]]:
    """The time of model ``key``'s first Podman ``action`` event after ``since``, and all its events since then.

    Asked up to 10 times: an events query right after the fact now and then comes back empty.
    """
    events: list[tuple[float, str, str]] = []
    for _ in range(10):
        events = await asyncio.to_thread(container_events, bench.podman, since - 1, sparkd.prefix)
        found = next((t for t, a, m in events if m == sparkd.model(key) and a == action and t >= since), None)
        if found is not None:
            return found, events
        await asyncio.sleep(0.3)
    raise RuntimeError(f"no Podman {action} event for {sparkd.model(key)} after {since}: {events}")


def sparkd_events(daemon: Sparkd, since: float, prefix: str = "model_") -> list[tuple[float, str, str]]:
    """(wall time, event, model) of the daemon's JSON log events named ``prefix...`` since ``since``."""
    from datetime import datetime

    out = []
    for line in daemon.logs().splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
            moment = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if moment >= since and str(record.get("event", "")).startswith(prefix):
            out.append((moment, record["event"], str(record.get("model", ""))))
    return out


def engine_model(image: str, **kwargs: Any) -> dict[str, Any]:
    from harness import engine_model as make

    return make(image, **kwargs)


def load_image_builder() -> Any:
    spec = importlib.util.spec_from_file_location("sparkd_test_images_build", REPO / "tests" / "images" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_image(podman: Any) -> str:
    build = load_image_builder()
    tag = build.engine_tag()
    if not podman.images.exists(tag):
        print(f"# building the test engine image {tag} ...", flush=True)
        build.build_engine()
    return tag


# ---------------------------------------------------------------- /proc


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_times(pid))


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM ... from /proc/<pid>/status, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Vm"):
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0])
    return out


def machine_line() -> str:
    load = os.getloadavg()
    return f"cores={os.cpu_count()} loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}"


def other_containers(podman: Any, prefixes: list[str]) -> list[str]:
    """Running containers that are not ours: other work on this machine that makes figures noisy."""
    names = []
    for container in podman.containers.list():
        model = (container.labels or {}).get("io.sparkd.model", "")
        if not any(model.startswith(p + "-") for p in prefixes):
            names.append(container.name)
    return names


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float], unit: str = "ms") -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} min={min(values):.3f} p50={percentile(values, 50):.3f} p90={percentile(values, 90):.3f} "
        f"p99={percentile(values, 99):.3f} max={max(values):.3f} {unit}"
    )


# ---------------------------------------------------------------- the engine behind sparkd


@dataclass(frozen=True)
class Direct:
    """How to reach a model's engine without sparkd: its published port and internal key."""

    url: str
    key: str
    pid: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def direct_endpoint(sparkd: Sparkd, podman: Any, key: str) -> Direct:
    status = await sparkd.model_status(key)
    port = status["port"]
    if not port:
        raise RuntimeError(f"model {key} has no engine port (state {status['state']})")
    attrs = await asyncio.to_thread(lambda: podman.containers.get(sparkd.container(key)).attrs)
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"] if "=" in item)
    return Direct(url=f"http://127.0.0.1:{port}", key=env["VLLM_API_KEY"], pid=int(attrs["State"]["Pid"]))


async def first_byte_request(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[float, float, int, bytes]:
    """One HTTP/1.1 POST on a fresh connection: (wall time of the first response byte, of the last, status, body).

    A raw socket so "first byte" is exactly the first byte the kernel hands over.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    first = await reader.read(1)
    t_first = time.time()
    rest = await reader.read()
    t_last = time.time()
    writer.close()
    data = first + rest
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return t_first, t_last, status, data.partition(b"\r\n\r\n")[2]


# ---------------------------------------------------------------- the load generator process


class LoadGen:
    """tests/bench/loadgen.py in its own process, driven by JSON lines over stdin/stdout."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> LoadGen:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "loadgen.py"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=256 * 1024 * 1024,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.process and self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.call({"op": "quit"})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.process.wait(), 5)
            if self.process.returncode is None:
                self.process.kill()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        if command.get("op") == "quit":
            return {}
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        answer = json.loads(line)
        if "fatal" in answer:
            raise RuntimeError(f"load generator: {answer['fatal']}")
        return answer


# ---------------------------------------------------------------- profiling


class Profiler:
    """``py-spy record`` of a process for the duration of a ``with`` block (when --profile is given)."""

    def __init__(self, directory: Path | None, pid: int, name: str) -> None:
        self.directory = directory
        self.pid = pid
        self.name = name
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Profiler:
        if self.directory is None:
            return self
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            print("# --profile: py-spy not found (pip install py-spy); not profiling", flush=True)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw", "--threads", "--gil",
            "--output", str(self.directory / f"{self.name}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # let py-spy attach
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.process is None:
            return
        import signal

        self.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(self.process.wait(), 30)
        print(f"# profile written: {self.directory / (self.name + '.txt')} (collapsed stacks; summarize with "
              f"tests/bench/profile_top.py)", flush=True)


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sparkd-bench-"))


def other_daemons(bench: Bench) -> list[int]:
    """PIDs of sparkd daemons on this host that this run did not start (they may adopt or stop our containers)."""
    ours = {d.process.pid for d in bench.daemons if d.process is not None}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sparkd" in argv and b"serve" in argv and b"-m" in argv:
            pids.append(int(entry.name))
    return pids
