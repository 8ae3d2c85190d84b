"""Issue 3 acceptance: the GPU lease and the scheduler on real Podman with the test engine."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import aiohttp
import pytest

from harness import container_events, engine_model

pytestmark = pytest.mark.podman

BUDGET = {"gpu": {"memory_budget": 0.94}}


def running_intervals(events: list[tuple[float, str, str]]) -> dict[str, list[tuple[float, float]]]:
    """Per model, the [start, died] intervals the Podman events show."""
    intervals: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for stamp, action, model in events:
        if action == "start":
            opened[model] = stamp
        elif action == "died" and model in opened:
            intervals.setdefault(model, []).append((opened.pop(model), stamp))
    for model, stamp in opened.items():
        intervals.setdefault(model, []).append((stamp, float("inf")))
    return intervals


def overlaps(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> bool:
    return any(a0 < b1 and b0 < a1 for a0, a1 in first for b0, b1 in second)


async def stream_text(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, bytes]:
    async with session.post(url, json=body) as response:
        return response.status, await response.read()


async def test_alternating_requests_swap_at_most_twice_and_never_overlap(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, env={"FAKE_LOAD_DELAY": "0.5"}),
            "b": engine_model(engine_image, claim=0.8, env={"FAKE_LOAD_DELAY": "0.5"}),
            "u": engine_model(engine_image, claim=0.05, lifecycle="utility"),
        },
        BUDGET,
    )
    await sparkd.start()
    await sparkd.wait_state("u", "ready")
    since = time.time()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(sparkd.chat(session, key) for key in ["a", "b"] * 6))
    assert [status for status, _ in results] == [200] * 12
    events = container_events(podman, since, sparkd.prefix, {"start", "died"})
    starts = [model for _, action, model in events if action == "start"]
    swaps = len(starts) - 1
    assert swaps <= 2, events
    intervals = running_intervals(events)
    assert not overlaps(intervals.get(sparkd.model("a"), []), intervals.get(sparkd.model("b"), [])), intervals
    assert (await sparkd.model_status("u"))["state"] == "ready"


async def test_running_stream_finishes_before_the_swap(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, env={"FAKE_TOKEN_RATE": "20", "FAKE_TOKENS": "20"}),
            "b": engine_model(engine_image, claim=0.8),
        },
        # FIFO swaps: b's request drains a at once (the swap quantum would keep a while it has work).
        {**BUDGET, "lifecycle": {"swap_policy": "fifo"}},
    )
    await sparkd.start()
    body = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 20}
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        since = time.time()
        stream = asyncio.create_task(stream_text(session, sparkd.base_url + "/v1/chat/completions", body))
        await asyncio.sleep(0.3)
        b_request = asyncio.create_task(sparkd.chat(session, "b"))
        await asyncio.sleep(0.3)
        assert (await sparkd.model_status("a"))["state"] == "draining"
        assert (await sparkd.model_status("b"))["queued"] == 1
        status, streamed = await stream
        stream_done = time.time()
        assert (await b_request)[0] == 200
    assert status == 200
    assert streamed.rstrip().endswith(b"data: [DONE]")
    assert streamed.count(b'"content"') == 21  # the role chunk and all 20 tokens: the stream was not cut
    assert b'"finish_reason":"length"' in streamed
    b_start = [t for t, action, model in container_events(podman, since, sparkd.prefix, {"start"}) if model == sparkd.model("b")]
    assert b_start and b_start[0] >= stream_done - 0.05


async def test_exclusive_model_stops_utility_first_and_utility_returns(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory(
        {
            "u": engine_model(engine_image, claim=0.05, lifecycle="utility"),
            "x": engine_model(engine_image, claim=0.94, lifecycle="exclusive"),
        },
        BUDGET,
    )
    await sparkd.start()
    await sparkd.wait_state("u", "ready")
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "x"))[0] == 200
        assert (await sparkd.admin("POST", f"/api/models/{sparkd.model('x')}/stop"))[0] == 200
    await sparkd.wait_state("u", "ready", timeout=15)
    # The containers' own start and finish times (Podman's event stream can miss events under load):
    # u finished before x started, and started again after x finished.
    u_state = podman.containers.get(sparkd.container("u")).attrs["State"]
    x_state = podman.containers.get(sparkd.container("x")).attrs["State"]
    order = [podman_time(u_state["FinishedAt"]), podman_time(x_state["StartedAt"]),
             podman_time(x_state["FinishedAt"]), podman_time(u_state["StartedAt"])]
    assert order == sorted(order) and len(set(order)) == 4, (u_state, x_state)


def podman_time(stamp: str) -> float:
    """Seconds since the epoch of a Podman time (RFC 3339 with up to nine fraction digits, trailing zeros cut)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp() + float("0." + (fraction or "0"))


async def test_queue_limits_timeouts_and_disconnects(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, env={"FAKE_TOKEN_RATE": "5"}),
            "b": engine_model(engine_image, claim=0.8),
        },
        {**BUDGET, "lifecycle": {"queue_size": 2, "queue_timeout_s": 1.5}},
    )
    await sparkd.start()
    hold = {"model": sparkd.model("a"), "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 40}
    async with aiohttp.ClientSession() as session:
        holder = asyncio.create_task(stream_text(session, sparkd.base_url + "/v1/chat/completions", hold))
        await sparkd.wait_state("a", "ready")
        await asyncio.sleep(0.2)
        waiting = [asyncio.create_task(sparkd.chat(session, "b")) for _ in range(2)]
        await asyncio.sleep(0.3)
        async with session.post(sparkd.base_url + "/v1/chat/completions", json={"model": sparkd.model("b"), "messages": [{"role": "user", "content": "x"}]}) as full:
            assert full.status == 503
            assert int(full.headers["Retry-After"]) >= 1
            assert (await full.json())["error"]["code"] == "queue_full"
        for status, body in await asyncio.gather(*waiting):
            assert status == 504, body
            assert body["error"]["code"] == "queue_timeout"
        # A client that leaves while waiting leaves the queue.
        leaver = asyncio.create_task(sparkd.chat(session, "b"))
        await asyncio.sleep(0.3)
        assert (await sparkd.model_status("b"))["queued"] == 1
        leaver.cancel()
        deadline = time.monotonic() + 3
        while (await sparkd.model_status("b"))["queued"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await sparkd.model_status("b"))["queued"] == 0
        holder.cancel()


async def test_reject_policy_answers_429_with_the_busy_model(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, claim=0.8), "b": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "lifecycle": {"policy": "reject"}},
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        body = {"model": sparkd.model("b"), "messages": [{"role": "user", "content": "x"}]}
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=body) as response:
            assert response.status == 429
            assert response.headers["X-Busy-Model"] == sparkd.model("a")
            assert int(response.headers["Retry-After"]) > 0
            error = (await response.json())["error"]
    assert error["busy_model"] == sparkd.model("a")
    assert error["releases"] is True and error["releases_in_s"] > 0
    assert error["busy_model_uptime_s"] >= 0 and error["busy_model_idle_s"] >= 0


async def test_restart_after_kill_adopts_the_running_model(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"a": engine_model(engine_image, claim=0.8, env={"FAKE_LOAD_DELAY": "2"})}, BUDGET)
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        sparkd.kill()
        since = time.time()
        await sparkd.start()
        status = await sparkd.model_status("a")
        assert status["state"] == "ready" and status["holds"] == 0.8
        assert status["uptime_s"] >= 1
        began = time.monotonic()
        assert (await sparkd.chat(session, "a"))[0] == 200
        assert time.monotonic() - began < 1.5  # served at once: no cold start (the load takes 2 s)
    assert container_events(podman, since, sparkd.prefix, {"start"}) == []


async def test_sleep_capable_models_swap_without_restarting_containers(sparkd_factory, engine_image, podman):
    sleepy = {"VLLM_SERVER_DEV_MODE": "1"}
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8, sleep=True, env=sleepy, sleep_gpu_memory=0.05),
            "b": engine_model(engine_image, claim=0.8, sleep=True, env=sleepy, sleep_gpu_memory=0.05),
        },
        BUDGET,
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        for key in ("a", "b"):
            assert (await sparkd.chat(session, key))[0] == 200
        since = time.time()
        for key in ("a", "b", "a"):
            assert (await sparkd.chat(session, key))[0] == 200
        ports = {key: (await sparkd.model_status(key))["port"] for key in ("a", "b")}
        states = {}
        for key, port in ports.items():
            async with session.get(f"http://127.0.0.1:{port}/fake/state") as response:
                states[key] = await response.json()
    assert states["a"]["sleeps"] == 2 and states["a"]["wakes"] == 2
    assert states["b"]["sleeps"] == 2 and states["b"]["wakes"] == 1
    assert container_events(podman, since, sparkd.prefix, {"start", "died"}) == []
    assert (await sparkd.model_status("b"))["state"] == "sleeping"
    assert (await sparkd.model_status("b"))["holds"] == 0.05


async def test_engine_crash_mid_stream_fails_then_recovers(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, claim=0.8, env={"FAKE_CRASH_MID_STREAM": "3"})}, BUDGET)
    key = sparkd.add_user_key()  # the SDK sends some key, and only a real one passes
    await sparkd.start()
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=sparkd.base_url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIError) as caught:
        stream = await client.chat.completions.create(
            model=sparkd.model("a"), messages=[{"role": "user", "content": "x"}], stream=True
        )
        async for _chunk in stream:
            pass
    assert "stopped in the middle" in str(caught.value)
    failed = await sparkd.wait_state("a", "failed", timeout=5)
    assert "exited" in failed["failure"]["message"]
    assert (await sparkd.status())["lease"]["holders"] == {}
    chat = await client.chat.completions.create(model=sparkd.model("a"), messages=[{"role": "user", "content": "again"}])
    assert chat.choices[0].message.content.startswith("again")
    await client.close()


async def test_second_daemon_on_the_same_gpu_lock_refuses(sparkd_factory, engine_image):
    first = sparkd_factory({"a": engine_model(engine_image)}, name="first")
    await first.start()
    second = sparkd_factory({"a": engine_model(engine_image)}, {"server": {"runtime_dir": str(first.workdir / "run")}}, name="second")
    await second.start(wait=False)
    assert await asyncio.to_thread(second.process.wait, 15) == 1
    assert "already manages this GPU" in second.logs()
    assert "gpu.lock" in second.logs()


async def test_load_progress_and_eta_from_past_loads(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "3"})}, {"lifecycle": {"idle_stop_s": 1}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(sparkd.chat(session, "a"))
        seen = set()
        while not first.done():
            status = await sparkd.model_status("a")
            if status["progress"]:
                seen.add(status["progress"]["phase"])
            await asyncio.sleep(0.1)
        assert (await first)[0] == 200
        assert "loading weights" in seen, seen
        eta = (await sparkd.model_status("a"))["eta_s"]
        assert 2.5 <= eta <= 6
        assert (sparkd.workdir / "state" / "load-times.json").exists()
        await sparkd.wait_state("a", "stopped", timeout=10)
        second = asyncio.create_task(sparkd.chat(session, "a"))
        starting = await sparkd.wait_state("a", "starting")
        assert starting["eta_s"] == eta and starting["loading_for_s"] is not None
        assert (await second)[0] == 200


async def test_restart_stops_strays_stale_specs_and_what_exceeds_the_budget(sparkd_factory, engine_image, podman):
    models = {key: engine_model(engine_image, claim=0.2) for key in ("a", "b", "stray", "stale")}
    sparkd = sparkd_factory(models, BUDGET)
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        for key in ("a", "b", "stray", "stale"):
            assert (await sparkd.chat(session, key))[0] == 200
    sparkd.kill()
    del sparkd.models["stray"]
    sparkd.models["a"] = engine_model(engine_image, claim=0.6)  # a claim is not part of the container spec
    sparkd.models["b"] = engine_model(engine_image, claim=0.6)
    sparkd.models["stale"] = engine_model(engine_image, claim=0.2, args=["--fake-tokens", "2"])
    sparkd.write_config()
    await sparkd.start()
    states = {key: (await sparkd.model_status(key))["state"] for key in ("a", "b", "stale")}
    # b started after a: it is kept; a would exceed the budget beside it.
    assert states == {"a": "stopped", "b": "ready", "stale": "stopped"}
    listed = podman.containers.list(all=True, filters={"label": f"io.sparkd.instance={sparkd.prefix}"})
    status = {c.name: c.attrs["State"] for c in listed}  # the list API gives the state as a word
    assert status[sparkd.container("stray")] == "exited"
    assert status[sparkd.container("stale")] == "exited"
    assert status[sparkd.container("a")] == "exited"
    assert status[sparkd.container("b")] == "running"
    assert "container_not_adopted" in sparkd.logs()
