"""How much GPU memory is really available, so a swap waits for it instead of sleeping.

* discrete GPUs: ``nvidia-smi`` reports used/total memory per GPU;
* unified-memory machines (DGX Spark): ``nvidia-smi`` prints ``[N/A]`` for GPU
  memory, and the GPU allocates from system RAM, so ``MemAvailable`` in
  /proc/meminfo is the measure;
* neither (no NVIDIA driver, e.g. CI): nothing to measure; a stopped container
  being gone is enough.

What one container uses (``container_bytes``, its measured footprint) follows the
same split: on unified memory, the memory charged to its cgroup (the GPU's
allocations included); on a discrete GPU, the GPU memory ``nvidia-smi`` reports
for the compute processes that live in the container's cgroup.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("sparkd.scheduler")

POLL_S = 0.2


@dataclass(frozen=True)
class Reading:
    available: float
    total: float
    unit_bytes: float = 1.0
    """Bytes per unit of ``available`` and ``total`` (kB for /proc/meminfo, MiB for nvidia-smi)."""

    @property
    def fraction(self) -> float:
        return self.available / self.total if self.total else 0.0

    @property
    def available_bytes(self) -> int:
        return int(self.available * self.unit_bytes)


NVIDIA_SMI_TIMEOUT_S = 5.0


class MemoryGauge:
    def __init__(
        self, mode: str, meminfo: str = "/proc/meminfo", nvidia_smi: str | None = "nvidia-smi",
        timeout_s: float = NVIDIA_SMI_TIMEOUT_S, drop_caches: str = "/proc/sys/vm/drop_caches",
    ) -> None:
        self.mode = mode
        self._timeout_s = timeout_s
        self._meminfo = Path(meminfo)
        self._drop_caches = Path(drop_caches)
        self._nvidia_smi = shutil.which(nvidia_smi) if nvidia_smi else None

    @property
    def unified(self) -> bool:
        """The GPU allocates from system memory (DGX Spark): what the CPU, the page cache and
        every engine use comes out of one pool, read as MemAvailable."""
        return self.mode == "meminfo"

    @property
    def measures_containers(self) -> bool:
        """Whether one container's share can be measured (``container_bytes``)."""
        return self.mode in ("meminfo", "nvidia-smi")

    async def container_bytes(self, pid: int) -> int | None:
        """What the container whose first process is ``pid`` holds of the memory the lease shares,
        in bytes; None when it cannot be told (the process is gone, no probe, nvidia-smi failed)."""
        if self.mode == "meminfo":
            return await asyncio.to_thread(container_memory_bytes, pid)
        if self.mode != "nvidia-smi":
            return None
        output = await self._run_nvidia_smi("--query-compute-apps=pid,used_memory")
        if output is None:
            return None
        return await asyncio.to_thread(container_gpu_bytes, pid, parse_compute_apps(output))

    async def resolve(self) -> None:
        """Settle ``auto`` to the source that works on this machine."""
        if self.mode != "auto":
            return
        if self._nvidia_smi is None:
            self.mode = "none"
        elif await self._read_nvidia_smi() is not None:
            self.mode = "nvidia-smi"
        else:
            self.mode = "meminfo"  # driver present, no per-GPU memory: unified memory
        log.info("memory_probe_selected", probe=self.mode)

    async def read(self) -> Reading | None:
        if self.mode == "nvidia-smi":
            return await self._read_nvidia_smi()
        if self.mode == "meminfo":
            return await asyncio.to_thread(self._read_meminfo)
        return None

    async def wait_for(self, fraction: float, timeout: float) -> float:
        """Wait until ``fraction`` of the memory is available (bounded); returns seconds waited."""
        started = time.monotonic()
        if fraction <= 0:
            return 0.0
        while True:
            reading = await self.read()
            waited = time.monotonic() - started
            if reading is None or reading.fraction >= fraction:
                return waited
            if waited >= timeout:
                log.warning(
                    "memory_reclaim_timeout",
                    wanted_fraction=round(fraction, 3),
                    available_fraction=round(reading.fraction, 3),
                    waited_s=round(waited, 1),
                )
                return waited
            await asyncio.sleep(POLL_S)

    async def drop_page_cache_if_short(self, needed: int) -> bool:
        """Drop the page cache when memory that is free outright (MemFree, the cache not counted) is
        under ``needed`` bytes, as Spark owners do by hand before a large load; True when dropped.
        Needs root (CAP_SYS_ADMIN) and a writable /proc/sys: otherwise logged and skipped."""
        try:
            free = parse_mem_free(await asyncio.to_thread(self._meminfo.read_text))
        except OSError:
            return False
        if free is None or free >= needed:
            return False
        try:
            await asyncio.to_thread(self._drop_caches.write_text, "1\n")
        except OSError as error:
            log.warning("page_cache_drop_failed", path=str(self._drop_caches), error=str(error),
                        fix="gpu.drop_caches_before_load needs sparkd to run as root with a writable /proc/sys")
            return False
        log.info("page_cache_dropped", free_bytes=free, needed_bytes=needed)
        return True

    async def _read_nvidia_smi(self) -> Reading | None:
        output = await self._run_nvidia_smi("--query-gpu=memory.used,memory.total")
        return parse_nvidia_smi(output) if output is not None else None

    async def _run_nvidia_smi(self, query: str) -> str | None:
        """``nvidia-smi QUERY --format=csv,noheader,nounits``'s output; None when it cannot run or hangs."""
        if self._nvidia_smi is None:
            return None
        try:
            process = await asyncio.create_subprocess_exec(
                self._nvidia_smi,
                query,
                "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return None
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout=self._timeout_s)
        except asyncio.TimeoutError:
            log.warning("nvidia_smi_timeout", timeout_s=self._timeout_s, pid=process.pid)
            return None
        finally:
            if process.returncode is None:
                # A wedged driver makes nvidia-smi hang: kill it rather than leave one per poll behind.
                process.kill()
                await process.wait()
        return output.decode(errors="replace") if process.returncode == 0 else None

    def _read_meminfo(self) -> Reading | None:
        try:
            return parse_meminfo(self._meminfo.read_text())
        except OSError:
            return None


def parse_nvidia_smi(text: str) -> Reading | None:
    """First GPU's ``used, total`` (MiB); None when the driver reports no numbers (``[N/A]``)."""
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            used, total = float(parts[0]), float(parts[1])
        except ValueError:
            return None
        return Reading(available=total - used, total=total, unit_bytes=1024 * 1024)
    return None


def parse_compute_apps(text: str) -> dict[int, int]:
    """``pid, used_memory`` lines (MiB) of ``--query-compute-apps``: pid → bytes.  Lines the driver
    cannot fill (``[N/A]``, as on unified memory) are left out."""
    apps: dict[int, int] = {}
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        apps[int(parts[0])] = apps.get(int(parts[0]), 0) + int(parts[1]) * 1024 * 1024
    return apps


def container_gpu_bytes(pid: int, apps: dict[int, int], proc: Path = Path("/proc")) -> int | None:
    """The GPU memory of the ``apps`` (pid → bytes) that run in the cgroup of process ``pid`` (a
    container's first process) or below it.  None when ``pid`` is gone.  Blocking: a worker thread."""
    home = _cgroup_paths(proc / str(pid) / "cgroup")
    if not home:
        return None  # gone, or in the root cgroup: no container to tell its processes by
    used = 0
    for app, held in apps.items():
        paths = _cgroup_paths(proc / str(app) / "cgroup")
        if paths and any(path == mine or path.startswith(mine.rstrip("/") + "/") for path in paths for mine in home):
            used += held
    return used


def _cgroup_paths(cgroup: Path) -> set[str] | None:
    """The cgroup paths of a process (one per hierarchy; v2 has one), None when it is gone."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    return {line.split(":", 2)[2] for line in lines if line.count(":") >= 2 and line.split(":", 2)[2] not in ("", "/")}


def parse_meminfo(text: str) -> Reading | None:
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name] = float(fields[0])
    if "MemAvailable" not in values or "MemTotal" not in values:
        return None
    return Reading(available=values["MemAvailable"], total=values["MemTotal"], unit_bytes=1024)


def parse_mem_free(text: str) -> int | None:
    """MemFree in bytes: memory in no use at all (MemAvailable also counts the droppable cache)."""
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name == "MemFree" and fields and fields[0].isdigit():
            return int(fields[0]) * 1024
    return None


def container_memory_bytes(pid: int, proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory charged to the cgroup of process ``pid`` (a container's first process), in bytes.

    cgroup v2 (``0::/path``) reads ``memory.current``; v1 (``N:memory:/path``)
    ``memory.usage_in_bytes``; without either, the process's own resident size.
    None when the process is gone.  Blocking (file reads): call it in a worker thread.
    """
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    used = _cgroup_value(lines, cgroups, "memory.current", "memory.usage_in_bytes")
    return used if used is not None else _resident_bytes(proc / str(pid) / "status")


def container_memory_peak_bytes(pid: int, proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The most memory the cgroup of process ``pid`` ever held, as the kernel counted it (v2
    ``memory.peak``, kernel 5.19 and later; v1 ``memory.max_usage_in_bytes``): a load's true
    peak, which sampling can miss.  None when the kernel keeps none or the process is gone.
    Blocking: call it in a worker thread."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    return _cgroup_value(lines, cgroups, "memory.peak", "memory.max_usage_in_bytes")


def _cgroup_value(lines: list[str], cgroups: Path, v2_file: str, v1_file: str) -> int | None:
    """A memory controller's figure for the cgroup a process's ``/proc/PID/cgroup`` lines name;
    the v1 memory controller first on a hybrid host (there it is the one that counts)."""
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            candidates.append(cgroups / relative / v2_file)
        elif "memory" in controllers.split(","):
            candidates.insert(0, cgroups / "memory" / relative / v1_file)
    for candidate in candidates:
        try:
            return int(candidate.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _resident_bytes(status: Path) -> int | None:
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
