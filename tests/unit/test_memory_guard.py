"""Issue 16 point 4: the memory guard's readings and its verdict, on files laid out as the kernel does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sparkd.hardware.memory import (
    MemoryGauge,
    container_gpu_bytes,
    container_memory_bytes,
    container_memory_peak_bytes,
    parse_compute_apps,
    parse_meminfo,
    parse_nvidia_smi,
)
from sparkd.scheduler.guard import LoadWatch, Tripped, guard_message

MIB = 1024 * 1024


def fake_proc(root: Path, pid: int, cgroup: str, status: str = "VmRSS:\t  2048 kB\n") -> Path:
    proc = root / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(cgroup)
    (proc / str(pid) / "status").write_text(status)
    return proc


def test_readings_know_their_unit():
    meminfo = parse_meminfo("MemTotal: 1000 kB\nMemAvailable: 500 kB\n")
    smi = parse_nvidia_smi("1024, 81920\n")
    assert meminfo is not None and meminfo.available_bytes == 500 * 1024
    assert smi is not None and smi.available_bytes == (81920 - 1024) * MIB


def test_container_memory_from_cgroup_v2_v1_or_rss(tmp_path):
    cgroups = tmp_path / "cgroup"
    (cgroups / "machine.slice" / "libpod-a.scope").mkdir(parents=True)
    (cgroups / "machine.slice" / "libpod-a.scope" / "memory.current").write_text("734003200\n")
    proc = fake_proc(tmp_path / "v2", 41, "0::/machine.slice/libpod-a.scope\n")
    assert container_memory_bytes(41, proc, cgroups) == 734003200

    (cgroups / "memory" / "libpod_parent" / "libpod-b").mkdir(parents=True)
    (cgroups / "memory" / "libpod_parent" / "libpod-b" / "memory.usage_in_bytes").write_text("5242880\n")
    hybrid = "12:memory:/libpod_parent/libpod-b\n3:cpu,cpuacct:/libpod_parent/libpod-b\n0::/libpod_parent/libpod-b\n"
    proc = fake_proc(tmp_path / "v1", 42, hybrid)
    assert container_memory_bytes(42, proc, cgroups) == 5242880  # the v1 memory controller wins on a hybrid host

    proc = fake_proc(tmp_path / "none", 43, "0::/gone\n")
    assert container_memory_bytes(43, proc, cgroups) == 2048 * 1024  # no cgroup file: the process's own RSS
    assert container_memory_bytes(44, proc, cgroups) is None  # the process is gone


def test_the_kernels_high_water_mark_of_the_cgroup_is_the_peak(tmp_path):
    cgroups = tmp_path / "cgroup"
    (cgroups / "machine.slice" / "libpod-a.scope").mkdir(parents=True)
    (cgroups / "machine.slice" / "libpod-a.scope" / "memory.peak").write_text("900000000\n")
    proc = fake_proc(tmp_path / "v2", 41, "0::/machine.slice/libpod-a.scope\n")
    assert container_memory_peak_bytes(41, proc, cgroups) == 900000000
    (cgroups / "memory" / "libpod_parent" / "libpod-b").mkdir(parents=True)
    (cgroups / "memory" / "libpod_parent" / "libpod-b" / "memory.max_usage_in_bytes").write_text("6291456\n")
    proc = fake_proc(tmp_path / "v1", 42, "12:memory:/libpod_parent/libpod-b\n0::/libpod_parent/libpod-b\n")
    assert container_memory_peak_bytes(42, proc, cgroups) == 6291456
    old_kernel = fake_proc(tmp_path / "old", 43, "0::/gone\n")
    assert container_memory_peak_bytes(43, old_kernel, cgroups) is None  # no memory.peak before 5.19: samples only
    assert container_memory_peak_bytes(44, old_kernel, cgroups) is None


def test_this_process_is_measured_for_real():
    used = container_memory_bytes(os.getpid())
    assert used is not None and used > 10 * MIB


async def test_load_watch_trips_under_the_floor_on_unified_memory_only(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")  # 4 GiB free
    floor = 3 * 1024 * MIB
    watch = LoadWatch(MemoryGauge("meminfo", meminfo=str(meminfo)), floor, os.getpid())
    assert await watch.sample() is None
    assert watch.peak is not None and watch.peak > 10 * MIB  # the watched process's memory, its peak so far
    meminfo.write_text("MemTotal: 8388608 kB\nMemAvailable: 2097152 kB\n")  # 2 GiB free
    tripped = await watch.sample()
    assert tripped == Tripped(available=2 * 1024 * MIB, floor=floor, peak=watch.peak)
    # Without a probe there is no floor and nothing to measure a container by.
    blind = LoadWatch(MemoryGauge("none"), floor, os.getpid())
    assert await blind.sample() is None and blind.peak is None
    assert await LoadWatch(MemoryGauge("meminfo", meminfo=str(meminfo)), 0, None).sample() is None  # min_free = 0


def test_guard_message_names_the_model_its_peak_and_the_setting():
    text = guard_message("glm-4.5-air", Tripped(available=1024 * MIB, floor=4096 * MIB, peak=90_000 * MIB), "loading")
    assert "model glm-4.5-air" in text and "while it was loading" in text
    assert "gpu.min_free = 4294967296 bytes (4096 MiB)" in text and "measured peak was 90000 MiB" in text
    assert "not measurable" in guard_message("m", Tripped(1, 2, None), "running")


async def test_the_page_cache_is_dropped_only_when_the_load_would_not_fit_beside_it(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8388608 kB\nMemFree: 1048576 kB\nMemAvailable: 6291456 kB\n")  # 1 GiB free, 6 with the cache
    knob = tmp_path / "drop_caches"
    knob.write_text("")
    gauge = MemoryGauge("meminfo", meminfo=str(meminfo), drop_caches=str(knob))
    assert await gauge.drop_page_cache_if_short(512 * MIB) is False and knob.read_text() == ""
    assert await gauge.drop_page_cache_if_short(2048 * MIB) is True and knob.read_text() == "1\n"
    # Without the privilege: logged, the load goes on.
    locked = MemoryGauge("meminfo", meminfo=str(meminfo), drop_caches=str(tmp_path / "no" / "such"))
    assert await locked.drop_page_cache_if_short(2048 * MIB) is False


def test_compute_apps_are_read_per_process_and_unfilled_lines_left_out():
    text = "4101, 20480\n4102, [N/A]\nnot a line\n4101, 512\n\n4200, 96\n"
    assert parse_compute_apps(text) == {4101: (20480 + 512) * MIB, 4200: 96 * MIB}
    assert parse_compute_apps("[N/A], [N/A]\n") == {}  # unified memory: nvidia-smi knows no figures


def test_a_containers_gpu_memory_is_that_of_the_processes_in_its_cgroup(tmp_path):
    mine = "/libpod_parent/libpod-a"
    proc = fake_proc(tmp_path, 50, f"4:memory:{mine}\n1:cpu:{mine}\n0::{mine}\n")
    fake_proc(tmp_path, 51, f"4:memory:{mine}\n0::{mine}\n")  # the engine core, same container
    fake_proc(tmp_path, 52, f"0::{mine}/worker\n")  # in a cgroup below the container's
    fake_proc(tmp_path, 60, "0::/libpod_parent/libpod-ab\n")  # another container (its name only starts alike)
    fake_proc(tmp_path, 61, "4:memory:/\n0::/\n")  # on the host
    apps = {51: 1000 * MIB, 52: 24 * MIB, 60: 5000 * MIB, 61: 7 * MIB, 70: 9 * MIB}  # 70: exited since
    assert container_gpu_bytes(50, apps, proc) == 1024 * MIB
    assert container_gpu_bytes(50, {}, proc) == 0  # a container with no GPU process holds nothing
    assert container_gpu_bytes(99, apps, proc) is None  # the container's process is gone
    assert container_gpu_bytes(61, apps, proc) is None  # the root cgroup tells no container apart


async def test_the_gauge_asks_nvidia_smi_for_the_containers_processes(tmp_path):
    tool = tmp_path / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --query-compute-apps=pid,used_memory) echo "{os.getpid()}, 300"; echo "1, 900" ;;\n'
        '  --query-gpu=memory.used,memory.total) echo "1200, 81920" ;;\n'
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    gauge = MemoryGauge("nvidia-smi", nvidia_smi=str(tool))
    assert gauge.measures_containers and not gauge.unified
    def cgroups(pid: int) -> set[str]:
        return {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()} - {"", "/"}

    if not cgroups(os.getpid()):
        pytest.skip("this process sits in the root cgroup: no container to tell it by")
    expected = 300 * MIB + (900 * MIB if cgroups(1) & cgroups(os.getpid()) else 0)
    assert await gauge.container_bytes(os.getpid()) == expected
    failing = tmp_path / "failing-smi"
    failing.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'\nexit 9\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    assert await MemoryGauge("nvidia-smi", nvidia_smi=str(failing)).container_bytes(os.getpid()) is None
    assert await MemoryGauge("none").container_bytes(os.getpid()) is None
