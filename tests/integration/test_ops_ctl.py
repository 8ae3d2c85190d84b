"""Issue 7 acceptance a and d: every sparkctl command against a running daemon and the test engine."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from harness import engine_model, free_port, write_keys
from opskit import Ctl, ctl, run_ctl, socket_path

pytestmark = pytest.mark.podman


async def test_admin_socket_is_created_with_mode_0660(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image)})
    await sparkd.start()
    path = socket_path(sparkd)
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o660
    await sparkd.stop()
    assert not path.exists()


async def test_status_shows_a_progress_bar_and_eta_during_a_slow_start(sparkd_factory, engine_image):
    # Models that stop and start again get ports of their own: other sparkd on this host use defaults.port_range.
    sparkd = sparkd_factory({"a": engine_model(engine_image, port=free_port(), env={"FAKE_LOAD_DELAY": "4"}), "b": engine_model(engine_image)})
    await sparkd.start()
    code, out, _ = await ctl(sparkd, "status")
    assert code == 0
    assert re.search(rf"{sparkd.model('a')}\s+stopped\s+0\.00\s+0\s+0", out), out
    assert "lease: 0.00 of 0.94 claimed (nobody)" in out

    async def watch_start() -> str:
        starting = asyncio.create_task(ctl(sparkd, "start", sparkd.model("a")))
        seen = []
        while not starting.done():
            code, out, _ = await ctl(sparkd, "status")
            line = next(line for line in out.splitlines() if line.startswith(sparkd.model("a")))
            if "starting" in line and "%" in line:
                seen.append(line)
            await asyncio.sleep(0.1)
        code, out, _ = await starting
        assert code == 0 and f"{sparkd.model('a')}: ready" in out, out
        return "\n".join(seen)

    # First load: no past load time, so the bar follows the engine's log (checkpoint shards %).
    first = await watch_start()
    assert re.search(r"\[[#-]{20}\]\s+\d+% loading weights \d+%", first), first
    code, out, _ = await ctl(sparkd, "stop", sparkd.model("a"))
    assert code == 0 and f"{sparkd.model('a')}: stopped" in out
    # Second load: the first one's duration is the ETA.
    second = await watch_start()
    assert re.search(r"\[[#-]{20}\]\s+\d+% .*ETA \d+s", second), second

    code, out, _ = await ctl(sparkd, "status", "--json")
    data = json.loads(out)
    entry = next(m for m in data["models"] if m["name"] == sparkd.model("a"))
    assert entry["state"] == "ready" and entry["eta_s"] > 3


async def test_models_and_start_sleep_wake_stop(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, sleep=True, claim=0.5, notes=["fast and small"], aliases=["alpha"], port=free_port()),
            "off": engine_model(engine_image, enabled=False, experimental=True, experimental_reason="crashes on GB10"),
        }
    )
    await sparkd.start()
    a = sparkd.model("a")
    code, out, _ = await ctl(sparkd, "models")
    assert code == 0
    assert re.search(rf"{a}\s+enabled\s+normal\s+0\.50", out), out
    assert re.search(rf"{sparkd.model('off')}\s+experimental \(off\)", out), out
    assert f"{sparkd.model('off')}: off: crashes on GB10" in out
    assert f"{a}: fast and small" in out and f"{a}: aliases: alpha" in out
    code, out, _ = await ctl(sparkd, "models", "--json")
    assert {m["name"]: m["enabled"] for m in json.loads(out)["models"]} == {a: True, sparkd.model("off"): False}

    for action, state in (("start", "ready"), ("sleep", "sleeping"), ("wake", "ready"), ("stop", "stopped")):
        code, out, err = await ctl(sparkd, action, a)
        assert code == 0, err
        assert out.startswith(f"{a}: {state} (took "), out
        assert (await sparkd.model_status("a"))["state"] == state
    code, out, _ = await ctl(sparkd, "start", "alpha", "--json")
    assert json.loads(out)["state"] == "ready"

    code, _, err = await ctl(sparkd, "start", "nope")
    assert code == 1 and "sparkd refused (404)" in err and "not configured" in err
    code, _, err = await ctl(sparkd, "start", sparkd.model("off"))
    assert code == 1 and "(409)" in err and "crashes on GB10" in err


async def test_logs_and_logs_follow_see_new_engine_output(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, port=free_port(), env={"FAKE_LOAD_DELAY": "0.5"})})
    await sparkd.start()
    a = sparkd.model("a")
    code, _, err = await ctl(sparkd, "logs", a)
    assert code == 1 and "has no container yet" in err and "sparkctl prepare" in err
    assert (await ctl(sparkd, "start", a))[0] == 0
    code, out, _ = await ctl(sparkd, "logs", a)
    assert code == 0 and "Application startup complete" in out
    code, out, _ = await ctl(sparkd, "logs", a, "-n", "2")
    # At most 2 (Podman 4.3's --tail glues a line written in two pieces to the next one).
    assert code == 0 and 1 <= len(out.splitlines()) <= 2 and "Starting to load model" not in out, out

    async with Ctl(sparkd, "logs", a, "-f", "-n", "5") as follow:
        await follow.wait_for("Application startup complete")
        async with aiohttp.ClientSession() as session:
            assert (await sparkd.chat(session, "a", "followed"))[0] == 200
        await follow.wait_for('"POST /v1/chat/completions HTTP/1.1" 200')
        # The container stops and starts again: the followed log goes on with the new run.
        assert (await ctl(sparkd, "stop", a))[0] == 0
        await follow.wait_for(f"container {sparkd.container('a')} stopped; waiting for it to start again")
        assert (await ctl(sparkd, "start", a))[0] == 0
        output = await follow.wait_for("Starting to load model", timeout=30)
        assert f"container {sparkd.container('a')} started" in output


async def test_top_refreshes_live(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "1"})})
    await sparkd.start()
    a = sparkd.model("a")
    code, out, _ = await ctl(sparkd, "top", "-n", "3", "-d", "0.3")
    assert code == 0
    assert out.count("IN-FLIGHT  QUEUED") == 3, out
    async with Ctl(sparkd, "top", "-d", "5") as top:
        await top.wait_for(f"{a}  stopped")
        starting = asyncio.create_task(ctl(sparkd, "start", a))
        # Updates arrive on change, long before the 5 s refresh.
        await top.wait_for(f"{a}: stopped -> starting (requested)", timeout=4)
        output = await top.wait_for(f"{a}: starting -> ready", timeout=20)
        assert re.search(rf"{a}\s+ready", output)
        await starting
    code, out, _ = await ctl(sparkd, "top", "-n", "2", "-d", "0.3", "--json")
    frames = [json.loads(line) for line in out.splitlines()]
    assert len(frames) == 2 and frames[0]["models"][0]["state"] == "ready"
    assert frames[0]["recent"][-1]["to"] == "ready"


async def test_prepare_creates_containers_without_starting_them_and_reports_a_missing_image(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image),
            "b": engine_model(engine_image),
            "m": engine_model("localhost/sparkd-no-such-image:1"),
        }
    )
    await sparkd.start()
    code, out, err = await ctl(sparkd, "prepare")
    assert code == 1, (out, err)
    assert re.search(rf"{sparkd.model('a')}\s+created \(not started\): {sparkd.container('a')}", out), out
    assert re.search(rf"{sparkd.model('b')}\s+created \(not started\)", out), out
    assert re.search(rf"{sparkd.model('m')}\s+IMAGE MISSING", out), out
    assert "image localhost/sparkd-no-such-image:1 not found" in out and "build it" in out
    for key in ("a", "b"):
        container = podman.containers.get(sparkd.container(key))
        assert container.status == "created", container.status
    assert not podman.containers.exists(sparkd.container("m"))
    assert (await sparkd.model_status("a"))["state"] == "stopped"

    code, out, _ = await ctl(sparkd, "prepare", sparkd.model("a"), "--json")
    assert code == 0
    [result] = json.loads(out)["results"]
    assert (result["model"], result["result"], result["status"]) == (sparkd.model("a"), "exists", "created")
    prepared = podman.containers.get(sparkd.container("a")).id
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a"))[0] == 200
    assert podman.containers.get(sparkd.container("a")).id == prepared  # the request used the prepared container
    code, out, _ = await ctl(sparkd, "prepare", sparkd.model("a"))
    assert code == 0 and "left alone" in out and "is ready" in out


async def test_unreachable_daemon_and_http_access(sparkd_factory, engine_image, tmp_path):
    code, _, err = await run_ctl("--socket", str(tmp_path / "nothing.sock"), "status")
    assert code == 3 and "no socket at" in err and "systemctl status sparkd" in err
    sparkd = sparkd_factory({"a": engine_model(engine_image)})
    admin = "sk-test-ctl-admin-0123456789abcdef"
    write_keys(sparkd.workdir / "keys.toml", {"ops": {"key": admin, "role": "admin"}})
    await sparkd.start()
    code, _, err = await run_ctl("--url", sparkd.base_url, "status")
    assert code == 1 and "(401)" in err  # keyless admin access is the unix socket only
    code, out, _ = await run_ctl("--url", sparkd.base_url, "status", env={"SPARKD_ADMIN_KEY": admin})
    assert code == 0 and sparkd.model("a") in out
    code, out, _ = await run_ctl("status", "--json", env={"SPARKD_SOCKET": str(socket_path(sparkd))})
    assert code == 0 and json.loads(out)["lease"]["budget"] == 0.94
