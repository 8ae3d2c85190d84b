"""Issue 7 acceptance c: the usage history survives a daemon restart."""

from __future__ import annotations

import json

import aiohttp
import pytest

from harness import engine_model, free_port
from opskit import ctl

pytestmark = pytest.mark.podman


async def test_history_survives_a_restart(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "1"}), "b": engine_model(engine_image)},
    )
    a, b = sparkd.model("a"), sparkd.model("b")
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            status, body = await sparkd.chat(session, "a", "count my tokens please")
            assert status == 200
        assert (await sparkd.chat(session, "b"))[0] == 200
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert (await ctl(sparkd, "stop", a))[0] == 0
    assert await sparkd.stop() == 0  # on_shutdown = stop: b's session ends with the daemon

    await sparkd.start()
    code, out, err = await ctl(sparkd, "history", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["models"][a]["loads"] == 1 and data["models"][a]["failed_loads"] == 0
    assert data["models"][a]["load_s"]["last"] >= 1.0  # FAKE_LOAD_DELAY
    assert data["models"][a]["requests"] == 3 and data["models"][b]["requests"] == 1
    sessions = {s["model"]: s for s in data["sessions"]}
    assert sessions[a]["end_state"] == "stopped" and sessions[a]["end_reason"] == "stopped by an operator"
    assert sessions[a]["requests"] == 3
    assert sessions[a]["peak_host_used_bytes"] is None or sessions[a]["peak_host_used_bytes"] > 0
    assert sessions[b]["end_reason"] == "sparkd is shutting down"
    [day_a] = [d for d in data["daily"] if d["model"] == a]
    assert day_a["requests"] == 3 and day_a["errors"] == 0
    assert day_a["prompt_tokens"] == 3 * prompt_tokens and day_a["completion_tokens"] > 0

    code, out, _ = await ctl(sparkd, "history", a)
    assert code == 0
    assert "stopped: stopped by an operator" in out and "3 requests" in out
    assert "loads (most recent first):" in out and "start" in out and "ready  (requested)" in out
    assert b not in out  # only the model asked for


async def test_a_kept_container_continues_its_session_across_a_restart(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, port=free_port())}, {"server": {"on_shutdown": "keep"}})
    a = sparkd.model("a")
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
        assert await sparkd.stop() == 0
        await sparkd.start()  # adopts the running container
        assert (await sparkd.model_status("a"))["state"] == "ready"
        assert (await sparkd.chat(session, "a"))[0] == 200
    _, out, _ = await ctl(sparkd, "history", a, "--json")
    [session_] = json.loads(out)["sessions"]
    assert session_["running"] and session_["ended_at"] is None
    assert (await ctl(sparkd, "stop", a))[0] == 0
    _code, out, _ = await ctl(sparkd, "history", a, "--json")
    [session_] = json.loads(out)["sessions"]
    assert session_["end_reason"] == "stopped by an operator" and session_["requests"] == 2
