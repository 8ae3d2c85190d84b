"""Issue 16: the lease on unified memory, with engines that really allocate memory.

The daemon is told the machine is unified memory by its probe setting
(``gpu.memory_probe = "meminfo"``): every figure it then reads is this machine's real
MemAvailable and the containers' real cgroups, and the fake engines' ``load_mb`` /
``ready_mb`` knobs really take that memory.  Floors are set relative to the memory
free when the test starts, so the tests hold on any machine with a few GB free.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from harness import engine_model
from opskit import ctl

pytestmark = pytest.mark.podman

MIB = 1024 * 1024


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def podman_time(stamp: str) -> float:
    """Seconds since the epoch of a Podman time (RFC 3339 with up to nine fraction digits)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp() + float("0." + (fraction or "0"))


class FloorWatch:
    """Reads MemAvailable every few milliseconds in a thread: when it first fell under ``floor``,
    and the lowest it went."""

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.crossed_at: float | None = None
        self.lowest = mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FloorWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            available = mem_available()
            self.lowest = min(self.lowest, available)
            if available < self.floor and self.crossed_at is None:
                self.crossed_at = time.time()
            time.sleep(0.002)


def unified(**gpu: object) -> dict[str, dict[str, object]]:
    return {"gpu": {"memory_probe": "meminfo", "memory_budget": 0.94, **gpu}}


async def test_guard_stops_a_load_that_takes_free_memory_under_the_floor(sparkd_factory, engine_image, podman):
    # The engine would take 3 GB over 10 s; the floor is 400 MB under what is free now, so the guard stops it
    # after a few hundred MB (more or less, as other processes on the machine take or give back memory).
    load_mb = 3000
    floor = mem_available() - 400 * MIB
    sparkd = sparkd_factory(
        {"big": engine_model(engine_image, claim=0.3, env={"FAKE_LOAD_DELAY": "10", "FAKE_LOAD_MB": str(load_mb),
                                                           "FAKE_READY_MB": "100"})},
        unified(min_free=floor),
    )
    await sparkd.start()
    with FloorWatch(floor) as watch:
        async with aiohttp.ClientSession() as session:
            status, body = await sparkd.chat(session, "big")
    assert status == 503, body
    error = body["error"]
    assert error["code"] == "memory_guard", error
    message = error["message"]
    assert sparkd.model("big") in message and "gpu.min_free" in message and str(floor) in message, message
    peak = re.search(r"measured peak was (\d+) MiB", message)
    assert peak is not None, message
    container = podman.containers.get(sparkd.container("big"))
    state = container.attrs["State"]
    assert not state["Running"], state
    held = [int(n) for n in re.findall(rb"fake memory: holding (\d+) MB", b"".join(container.logs(stdout=True, stderr=True)))]
    assert held and max(held) < load_mb, held  # stopped before it took all it asked for
    assert int(peak.group(1)) >= 0.8 * max(held), (message, held)  # the container's own memory, measured as it grew
    model = await sparkd.model_status("big")
    assert model["state"] == "failed" and "memory guard" in model["reason"], model
    assert watch.crossed_at is not None
    reaction = podman_time(state["FinishedAt"]) - watch.crossed_at
    print(
        f"\nmemory guard: floor {floor / MIB:.0f} MiB free; engine held at most {max(held)} MB of {load_mb}; "
        f"measured peak {peak.group(1)} MiB; lowest free {watch.lowest / MIB:.0f} MiB "
        f"({(floor - watch.lowest) / MIB:.0f} MiB under the floor); floor crossed -> container stopped: {reaction:.3f} s"
    )
    print(f"RESULT memory_guard_reaction {reaction:.3f} s")
    assert reaction > -0.5, (reaction, state)  # the stop followed the crossing (clocks: Podman's and ours)
    assert "memory_guard_stopped" in sparkd.logs()


async def test_guard_stops_the_largest_running_model_when_free_memory_falls_under_the_floor(
    sparkd_factory, engine_image, podman,
):
    sparkd = sparkd_factory(
        {
            "small": engine_model(engine_image, claim=0.2, env={"FAKE_READY_MB": "50"}),
            "large": engine_model(engine_image, claim=0.2, env={"FAKE_READY_MB": "400"}),
        },
        unified(min_free=0),
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "small"))[0] == 200
        assert (await sparkd.chat(session, "large"))[0] == 200
        # The machine's free memory is now under the floor (a reload raises it above what is free):
        # the running model holding the most memory goes, the other keeps serving.
        sparkd.settings["gpu"]["min_free"] = mem_available() + 200 * MIB
        sparkd.write_config()
        sparkd.reload()
        failed = await sparkd.wait_state("large", "failed", timeout=15)
        assert "memory guard while it was running" in failed["reason"] and "gpu.min_free" in failed["reason"], failed
        assert "code=memory_guard" in sparkd.logs()
        sparkd.settings["gpu"]["min_free"] = 0
        sparkd.write_config()
        sparkd.reload()
        assert (await sparkd.model_status("small"))["state"] == "ready"
        assert (await sparkd.chat(session, "small"))[0] == 200
    assert not podman.containers.get(sparkd.container("large")).attrs["State"]["Running"]


async def first_comment_about(session: aiohttp.ClientSession, url: str, body: dict[str, object], words: bytes) -> bytes:
    """Stream a request; return the first SSE comment containing ``words`` (then read the answer out)."""
    found = b""
    async with session.post(url, json=body) as response:
        assert response.status == 200
        while True:
            frame = await response.content.readuntil(b"\n\n")
            if not frame:
                break
            if not found and frame.startswith(b": sparkd: ") and words in frame:
                found = frame
            if frame.startswith(b"data: [DONE]"):
                break
    return found


@pytest.mark.parametrize(("concurrent_loads", "one_at_a_time"), [(0, True), (2, False)])
async def test_two_loads_never_overlap_on_unified_memory(sparkd_factory, engine_image, podman, concurrent_loads,
                                                          one_at_a_time):
    load_s = 3.0
    knobs = {"FAKE_LOAD_DELAY": str(load_s), "FAKE_LOAD_MB": "200", "FAKE_READY_MB": "100"}
    sparkd = sparkd_factory(
        {
            "u": engine_model(engine_image, claim=0.1, lifecycle="utility", env=knobs),
            "a": engine_model(engine_image, claim=0.3, env=knobs),
        },
        unified(min_free=0, concurrent_loads=concurrent_loads),
    )
    await sparkd.start()
    await sparkd.wait_state("u", "starting")  # the utility model loads on its own; a request for a arrives now
    body = {"model": sparkd.model("a"), "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        comment = await first_comment_about(session, sparkd.base_url + "/v1/chat/completions", body, b"finish loading")
    await sparkd.wait_state("u", "ready", timeout=15)
    u_started = podman_time(podman.containers.get(sparkd.container("u")).attrs["State"]["StartedAt"])
    a_started = podman_time(podman.containers.get(sparkd.container("a")).attrs["State"]["StartedAt"])
    # A container's load takes load_s from its start: a's container started after u's load was over.
    print(f"\nconcurrent_loads={concurrent_loads}: a's container started {a_started - u_started:.2f} s after u's")
    if one_at_a_time:
        assert a_started - u_started >= load_s, (u_started, a_started)
        assert comment.startswith(f": sparkd: {sparkd.model('a')} is queued, waiting for {sparkd.model('u')} "
                                  "to finish loading".encode()), comment
    else:
        assert a_started - u_started < load_s, (u_started, a_started)
        assert comment == b""


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


async def test_a_claim_far_below_what_the_engine_holds_is_admitted_by_its_measured_size(
    sparkd_factory, engine_image, podman,
):
    """Acceptance b: by their claims a and b fit together; once a measured what it really holds,
    b's start makes a go first, and the warning names the line to change."""
    total = mem_total()
    claim = round(150 * MIB / total, 4)
    budget = round(720 * MIB / total, 4)  # 2 claims fit; a's measured ~640 MiB fits alone, not beside b's claim
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=claim, env={"FAKE_LOAD_MB": "500", "FAKE_READY_MB": "600",
                                                              "FAKE_LOAD_DELAY": "1"}),
            "b": engine_model(engine_image, claim=claim, env={"FAKE_READY_MB": "20"}),
        },
        {"gpu": {"memory_probe": "meminfo", "memory_budget": budget, "min_free": 0}},
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        a = await sparkd.model_status("a")
        measured = a["footprint"]
        assert measured["ready_bytes"] >= 600 * MIB and measured["peak_bytes"] >= measured["ready_bytes"], measured
        assert measured["total_bytes"] == total
        assert a["claim"] == pytest.approx(measured["ready_bytes"] / total) and a["configured_claim"] == claim
        warning = a["claim_warnings"][0]
        source = str(sparkd.config_path)
        assert "set gpu_memory = " in warning and f"[models.{sparkd.model('a')}] in {source}" in warning, warning
        assert "model_claim_below_measured" in sparkd.logs()
        assert (await sparkd.chat(session, "b"))[0] == 200
    a_state = podman.containers.get(sparkd.container("a")).attrs["State"]
    b_state = podman.containers.get(sparkd.container("b")).attrs["State"]
    assert not a_state["Running"] and podman_time(a_state["FinishedAt"]) <= podman_time(b_state["StartedAt"])
    assert (await sparkd.model_status("a"))["reason"] == f"swapped out for {sparkd.model('b')}"
    b = await sparkd.model_status("b")
    print(
        f"\nfootprints: a peak {measured['peak_bytes'] / MIB:.0f} MiB, ready {measured['ready_bytes'] / MIB:.0f} MiB "
        f"(claim {claim * total / MIB:.0f} MiB); b ready {b['footprint']['ready_bytes'] / MIB:.0f} MiB"
    )
    # A restarted sparkd admits by what the history kept, before any new load.
    await sparkd.stop()
    await sparkd.start()
    again = await sparkd.model_status("a")
    assert again["footprint"]["ready_bytes"] == measured["ready_bytes"] and again["claim_warnings"], again
    code, out, _ = await ctl(sparkd, "models")
    assert code == 0 and f"{sparkd.model('a')}: measured: load peak" in out and "set gpu_memory" in out, out


async def test_a_brief_peak_of_a_load_is_measured_whole(sparkd_factory, engine_image):
    """The load peak is the kernel's high-water mark of the container's cgroup: a 10 ms spike,
    which readings every 0.1 s catch only part of if at all, is counted whole."""
    sparkd = sparkd_factory(
        {"s": engine_model(engine_image, claim=0.05, env={"FAKE_SPIKE_MB": "400", "FAKE_READY_MB": "50",
                                                          "FAKE_LOAD_DELAY": "1"})},
        unified(min_free=0),
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "s"))[0] == 200
    footprint = (await sparkd.model_status("s"))["footprint"]
    assert footprint["peak_bytes"] >= 400 * MIB > footprint["ready_bytes"], footprint
    print(f"\nspike: peak {footprint['peak_bytes'] / MIB:.0f} MiB, ready {footprint['ready_bytes'] / MIB:.0f} MiB")


async def fake_state(port: int) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/fake/state") as response:
        state: dict[str, object] = await response.json()
        return state


async def test_sleep_levels_free_what_they_say_and_the_claim_asleep_follows_the_measure(sparkd_factory, engine_image):
    knobs = {"FAKE_LOAD_MB": "500", "FAKE_READY_MB": "400", "FAKE_KV_MB": "100", "FAKE_LOAD_DELAY": "1"}
    sparkd = sparkd_factory(
        {
            # sleep_mode without --enable-sleep-mode in args: sparkd adds the flag and VLLM_SERVER_DEV_MODE itself.
            "one": engine_model(engine_image, claim=0.5, sleep_mode=True, sleep_level=1, sleep_gpu_memory=0.01, env=knobs),
            "two": engine_model(engine_image, claim=0.5, sleep_mode=True, sleep_gpu_memory=0.01, env=knobs),
        },
        unified(min_free=0),
    )
    await sparkd.start()
    measured: dict[str, dict[str, int]] = {}
    for key, level in (("one", 1), ("two", 2)):
        async with aiohttp.ClientSession() as session:
            assert (await sparkd.chat(session, key))[0] == 200
        port = (await sparkd.model_status(key))["port"]
        status, _ = await sparkd.admin("POST", f"/api/models/{sparkd.model(key)}/sleep")
        assert status == 200
        model = await sparkd.model_status(key)
        assert model["state"] == "sleeping", model
        engine = await fake_state(port)
        assert engine["sleep_level"] == level and "--enable-sleep-mode" in engine["argv"], engine  # type: ignore[operator]
        assert engine["env"]["VLLM_SERVER_DEV_MODE"] == "1", engine  # type: ignore[index]
        measured[key] = footprint = model["footprint"]
        assert footprint["sleep_level"] == level and footprint["ready_bytes"] >= 400 * MIB, footprint
        # The claim asleep is what the sleep released to, measured (above the configured 0.01 here).
        held = (await sparkd.status())["lease"]["holders"][sparkd.model(key)]
        assert held == pytest.approx(max(0.01, footprint["asleep_bytes"] / footprint["total_bytes"]), abs=1e-4)
    one, two = measured["one"], measured["two"]
    # Level 1 freed only the KV cache (100 of 400 MB), level 2 the weights too.
    assert one["ready_bytes"] - one["asleep_bytes"] == pytest.approx(100 * MIB, abs=40 * MIB), one
    assert two["ready_bytes"] - two["asleep_bytes"] == pytest.approx(400 * MIB, abs=40 * MIB), two
    for key, figures in measured.items():
        print(f"\n{key}: peak {figures['peak_bytes'] / MIB:.0f} MiB, ready {figures['ready_bytes'] / MIB:.0f} MiB, "
              f"asleep (level {figures['sleep_level']}) {figures['asleep_bytes'] / MIB:.0f} MiB")
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "one"))[0] == 200  # wakes
    assert (await fake_state((await sparkd.model_status("one"))["port"]))["resident_mb"] == 400


RESTARTED = "restarted after it was given up (engine_wedged)"


async def test_a_wedged_engine_is_failed_by_its_frozen_token_counters_and_restarted(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory(
        {"w": engine_model(engine_image, claim=0.2, env={"FAKE_FREEZE_AFTER": "3", "FAKE_TOKENS": "50"})},
        {"lifecycle": {"stall_s": 1.5}},
    )
    await sparkd.start()
    w = sparkd.model("w")
    body = {"model": w, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            answer = await response.read()  # ends: the engine is stopped under it
        took = time.monotonic() - began
        assert b"error" in answer and b"is wedged" in answer, answer  # the stream ends with an error event saying why
        print(f"\nwedged engine: stream ended {took:.1f} s after it began (stall_s 1.5)")
        # Started again by sparkd itself, with no request waiting for it (the stream ended when the
        # container stopped: the model may still show its old READY for a moment).
        deadline = time.monotonic() + 30
        model = await sparkd.model_status("w")
        while not (model["state"] == "ready" and model["reason"] == RESTARTED) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            model = await sparkd.model_status("w")
        assert model["state"] == "ready" and model["reason"] == RESTARTED, model
        assert podman.containers.get(sparkd.container("w")).attrs["State"]["Running"]
        assert "engine_wedged" in sparkd.logs()
        code, out, err = await ctl(sparkd, "history", w, "--json")
        assert code == 0, err
        ended = [s for s in json.loads(out)["sessions"] if s["end_state"] == "failed"]
        assert len(ended) == 1, out
        reason = ended[0]["end_reason"]
        assert "is wedged" in reason and "vllm:generation_tokens_total" in reason and "lifecycle.stall_s = 1.5" in reason
        assert "is being started again" in reason
        status, _ = await sparkd.chat(session, "w")  # the restarted engine answers
        assert status == 200
