"""Issue 19: model weights as a step of their own, against a stand-in hub serving the real-vLLM test model.

a. ``sparkctl pull`` downloads only the files vLLM loads, shows progress (a bar on a terminal, plain
   lines otherwise, bytes/rate/ETA in the admin API), resumes a transfer the hub cut mid-file where it
   stopped, and refuses before downloading when the disk (less ``weights.reserve_bytes``) is too small;
b. a first request for a model without weights waits through the pull and is answered by the real
   vLLM (offline, from the pulled cache); with ``auto_pull = false`` it is a 503 naming the command;
c. ``sparkctl models`` and ``/v1/models`` show presence and size, ``sparkd doctor`` lists absent ones;
d. a two-node model's pull fills the cache of both nodes (two daemons on this machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import realvllm
from harness import REPO, Sparkd, engine_model, free_port, write_keys
from opskit import CHROMIUM, Browser, ctl, socket_path
from standin_hub import StandInHub, file_digest, model_files, snapshot_file

pytestmark = pytest.mark.podman

REPO_ID = "test-org/smollm2-135m"
WEIGHTS = "model.safetensors"
SELECTED = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"}


@pytest.fixture(scope="module")
def hub_files(real_image: str) -> Path:
    return model_files(real_image, Path(os.environ.get("SPARKD_TEST_CACHE", "/var/cache/sparkd-test")))


@pytest.fixture
async def hub(hub_files: Path) -> Any:
    server = StandInHub(REPO_ID, hub_files)
    await server.start()
    yield server
    await server.close()


def weights_settings(hub: StandInHub, **weights: Any) -> dict[str, Any]:
    return {"weights": {"endpoint": hub.url, "reserve_bytes": 0, **weights}}


def pulled_model(image: str, cache: Path, **extra: Any) -> dict[str, Any]:
    return engine_model(image, hf_model=REPO_ID, volumes=[f"{cache}:/root/.cache/huggingface"], **extra)


async def pulls(sparkd: Sparkd) -> list[dict[str, Any]]:
    status, body = await sparkd.admin("GET", "/api/pulls")
    assert status == 200, body
    return body["pulls"]


async def models_v1(sparkd: Sparkd) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(sparkd.base_url + "/v1/models") as response:
        assert response.status == 200
        return {entry["id"]: entry for entry in (await response.json())["data"]}


async def test_pull_shows_progress_resumes_a_cut_transfer_and_takes_only_what_vllm_loads(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    cache = tmp_path / "hf"
    sparkd = sparkd_factory({"m": pulled_model(engine_image, cache)}, weights_settings(hub))
    await sparkd.start()
    name = sparkd.model("m")
    size = (hub.root / WEIGHTS).stat().st_size

    # The hub drops the connection 100 MB into the weights, on every try: the pull fails, its partial file stays.
    hub.cut_after[WEIGHTS] = 100_000_000
    code, out, err = await ctl(sparkd, "pull", name, timeout=120)
    assert code == 1, out + err
    assert f"{name}: FAILED" in out and WEIGHTS in out, out
    [partial] = (cache / "hub" / "models--test-org--smollm2-135m" / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept <= 100_000_000

    # Again, with the hub healthy and slow enough to watch: it resumes at the partial file's end.
    hub.cut_after.clear()
    hub.rate_bps = 40e6
    watched: list[dict[str, Any]] = []
    pulling = asyncio.create_task(ctl(sparkd, "pull", name, timeout=120))
    while not pulling.done():
        watched += [p for p in await pulls(sparkd) if p["state"] == "pulling"]
        await asyncio.sleep(0.3)
    code, out, err = await pulling
    assert code == 0, out + err
    assert f"{name}: done" in out, out
    assert hub.downloads(WEIGHTS)[-1] == f"bytes={kept}-", hub.requests
    # Plain lines (no terminal): percent, bytes, rate and ETA while it ran.
    progress_lines = [line for line in out.splitlines() if "%" in line]
    assert progress_lines and " of " in progress_lines[0] and "/s" in " ".join(progress_lines), out
    during = [p for p in watched if p["phase"] == "downloading" and p["rate_bps"]]
    assert during, watched
    assert during[-1]["total_bytes"] >= size and 0 < during[-1]["done_bytes"] < during[-1]["total_bytes"]
    assert during[-1]["eta_s"] is not None and during[-1]["eta_s"] > 0
    done_bytes = [p["done_bytes"] for p in during]
    assert done_bytes == sorted(done_bytes) and done_bytes[0] >= kept  # the resumed part counts from the start
    print(f"pull of {size} bytes at the hub's {hub.rate_bps / 1e6:.0f} MB/s: sparkd measured "
          f"{during[-1]['rate_bps'] / 1e6:.1f} MB/s, ETA {during[-1]['eta_s']:.1f} s at {done_bytes[-1]} bytes")

    # The checkpoint is the hub's, byte for byte, where vLLM looks; the other formats never came.
    assert file_digest(snapshot_file(cache / "hub", REPO_ID, WEIGHTS)) == hub.digest(WEIGHTS)
    fetched = {path for method, path, _ in hub.requests if method == "GET" and not path.startswith("/api/")}
    assert fetched == SELECTED, fetched
    [last] = [p for p in await pulls(sparkd) if p["model"] == name]
    assert last["state"] == "done" and last["done_bytes"] == last["total_bytes"]

    # A pull of complete weights downloads nothing.
    hub.requests.clear()
    code, out, _ = await ctl(sparkd, "pull", name)
    assert code == 0 and f"{name}: done" in out
    assert not [r for r in hub.requests if r[0] == "GET" and not r[1].startswith("/api/")]


async def test_pull_draws_a_progress_bar_on_a_terminal(sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path) -> None:
    sparkd = sparkd_factory({"m": pulled_model(engine_image, tmp_path / "hf")}, weights_settings(hub))
    await sparkd.start()
    hub.rate_bps = 60e6
    leader, follower = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkd.ctl", "--socket", str(socket_path(sparkd)), "pull", sparkd.model("m"),
        stdout=asyncio.subprocess.PIPE, stderr=follower, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(follower)
    await asyncio.wait_for(process.wait(), 120)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    text = terminal.decode(errors="replace")
    assert process.returncode == 0, text
    assert "[###" in text and "\x1b[F" in text and "/s" in text, text[-2000:]
    assert f"[{'#' * 30}] {sparkd.model('m')}: done" in text


async def test_pull_refuses_when_the_disk_would_keep_less_than_the_reserve(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    cache = tmp_path / "hf"
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    sparkd = sparkd_factory({"m": pulled_model(engine_image, cache)}, weights_settings(hub, reserve_bytes=free))
    await sparkd.start()
    code, out, _ = await ctl(sparkd, "pull", sparkd.model("m"))
    assert code == 1
    assert f"cannot pull model {sparkd.model('m')}: it needs 272." in out, out
    assert "must stay free (weights.reserve_bytes); free some space there or lower the reserve" in out
    assert not [r for r in hub.requests if r[0] == "GET" and r[1] == WEIGHTS]  # refused before downloading


async def test_models_and_doctor_show_presence_and_size(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    cache = tmp_path / "hf"
    sparkd = sparkd_factory(
        {"m": pulled_model(engine_image, cache), "plain": engine_model(engine_image)}, weights_settings(hub),
    )
    await sparkd.start()
    name = sparkd.model("m")

    def doctor() -> str:
        result = subprocess.run([sys.executable, "-m", "sparkd", "doctor", "--config", str(sparkd.config_path)],
                                capture_output=True, text=True, check=False, cwd=REPO)
        return result.stdout

    code, out, _ = await ctl(sparkd, "models")
    assert code == 0 and f"{name}: weights: absent, 0 B ({REPO_ID})" in out, out
    entry = (await models_v1(sparkd))[name]
    assert (entry["weights"], entry["weights_bytes"], entry["object"]) == ("absent", 0, "model")
    assert "weights" not in (await models_v1(sparkd))[sparkd.model("plain")]
    report = await asyncio.to_thread(doctor)
    assert f"WARN  weights    enabled models without their weights: {name} ({REPO_ID}: absent)" in report, report
    assert f"fix: sudo sparkctl pull {name}" in report

    assert (await ctl(sparkd, "pull", name, timeout=120))[0] == 0
    code, out, _ = await ctl(sparkd, "models", "--json")
    [listed] = [m for m in json.loads(out)["models"] if m["name"] == name]
    on_disk = sum(p.stat().st_size for p in (cache / "hub" / "models--test-org--smollm2-135m" / "blobs").iterdir())
    assert listed["weights"] == {"weights": "complete", "weights_bytes": on_disk, "weights_repo": REPO_ID}
    code, out, _ = await ctl(sparkd, "models")
    assert f"{name}: weights: complete, {on_disk / 1e6:.1f} MB ({REPO_ID})" in out, out
    assert (await models_v1(sparkd))[name]["weights"] == "complete"
    report = await asyncio.to_thread(doctor)
    assert "PASS  weights    the weights of 1 enabled models are in the cache" in report, report


async def test_auto_pull_off_is_a_503_naming_the_command(sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path) -> None:
    sparkd = sparkd_factory(
        {"m": pulled_model(engine_image, tmp_path / "hf")}, {**weights_settings(hub), "lifecycle": {"auto_pull": False}},
    )
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "m")
    assert status == 503, body
    assert body["error"]["code"] == "weights_missing"
    assert f"run `sparkctl pull {sparkd.model('m')}` and ask again" in body["error"]["message"]
    assert not [r for r in hub.requests if r[0] == "GET"]  # nothing was downloaded behind the operator's back
    # Once the operator pulls, the next request starts the model.
    code, out, _ = await ctl(sparkd, "pull", sparkd.model("m"), timeout=120)
    assert code == 0, out
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "m", "now with weights")
    assert status == 200, body


async def test_first_request_waits_through_the_pull_and_the_real_vllm_answers(
    sparkd_factory: Any, real_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    cache = tmp_path / "hf"
    table = realvllm.model_table(
        real_image, "--enforce-eager", entrypoint=["/opt/vllm/bin/vllm"], command=["serve", REPO_ID, "--host", "0.0.0.0", "--dtype", "bfloat16"],
        hf_model=REPO_ID, volumes=[f"{cache}:/root/.cache/huggingface"], env={"HF_HOME": "/root/.cache/huggingface"},
    )
    # A start timeout shorter than the pull: only the engine's own load counts against it.
    table["start_timeout_s"] = 400.0
    sparkd = sparkd_factory({"m": table}, weights_settings(hub))
    await sparkd.start()
    hub.rate_bps = 30e6
    name = sparkd.model("m")
    began = time.monotonic()
    seen: list[str] = []
    comments: list[str] = []

    async def ask() -> tuple[int, str]:
        payload = {"model": name, "stream": True, "max_tokens": 24, "temperature": 0,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(sparkd.base_url + "/v1/chat/completions", json=payload,
                                    timeout=aiohttp.ClientTimeout(total=900)) as response:
                text = ""
                async for raw in response.content:
                    line = raw.decode()
                    if line.startswith(": sparkd:"):
                        comments.append(line.strip())
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                return response.status, text

    asking = asyncio.create_task(ask())
    while not asking.done():
        model = await sparkd.model_status("m")
        if model["state"] in ("pulling", "starting") and model.get("progress"):
            seen.append(f"{model['state']}: {model['progress']['phase']}")
        await asyncio.sleep(0.5)
    status, text = await asking
    took = time.monotonic() - began
    assert status == 200 and "Paris" in text, (status, text, sparkd.logs()[-3000:])
    assert "pulling: downloading weights" in seen and "starting: downloading weights" not in seen, seen
    downloading = [c for c in comments if "downloading weights" in c]
    assert downloading and any("left" in c for c in downloading), comments
    assert file_digest(snapshot_file(cache / "hub", REPO_ID, WEIGHTS)) == hub.digest(WEIGHTS)
    podman_env = subprocess.run(["podman", "inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}",
                                 sparkd.container("m")], capture_output=True, text=True, check=True).stdout
    assert "HF_HUB_OFFLINE=1" in podman_env.splitlines()
    print(f"first request answered after {took:.0f} s (pull at {hub.rate_bps / 1e6:.0f} MB/s, then the engine's load); "
          f"comments while pulling: {downloading[:2]}")


PEER_KEY = "sk-sparkd-peer-weights-0123456789"
PEER_ADMIN_KEY = "sk-sparkd-peer-weights-admin-01234"


def two_nodes(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path, head_models: dict[str, Any] | None = None,
    head_lifecycle: dict[str, Any] | None = None,
) -> tuple[Sparkd, Sparkd]:
    """Node b, whose [workers] table mounts its own cache, and a head whose model spans local + b."""
    peer = sparkd_factory({}, {**weights_settings(hub), "cluster": {"address": "127.0.0.1", "devices": []}}, name="peer")
    peer.settings["workers"] = {
        peer.model("big"): {"image": engine_image, "gpu": False, "gpu_memory": 0.5,
                            "volumes": [f"{tmp_path / 'hf-b'}:/root/.cache/huggingface"]},
    }
    peer.settings["server"] = {"instance": peer.prefix + "b", "anonymous": "off"}
    peer.write_config()
    write_keys(peer.workdir / "keys.toml", {"head-a": {"key": PEER_KEY, "role": "peer"},
                                            "ops": {"key": PEER_ADMIN_KEY, "role": "admin"}})
    peer.admin_key = PEER_ADMIN_KEY
    key_file = tmp_path / "peer-b.key"
    key_file.write_text(PEER_KEY + "\n")
    key_file.chmod(0o600)
    big = pulled_model(engine_image, tmp_path / "hf-a", claim=0.5, nodes=["local", "b"], port=free_port())
    head = sparkd_factory({"big": big, **(head_models or {})}, {
        **weights_settings(hub), "cluster": {"address": "127.0.0.1", "devices": []}, "lifecycle": dict(head_lifecycle or {}),
        "peers": {"b": {"url": peer.base_url, "key_file": str(key_file), "address": "127.0.0.1", "insecure": True}},
    }, name="head")
    return head, peer


async def test_a_two_node_models_pull_fills_both_nodes_caches(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    head, peer = two_nodes(sparkd_factory, engine_image, hub, tmp_path)
    await peer.start()
    await head.start()
    hub.rate_bps = 60e6
    name = head.model("big")
    watched: list[dict[str, Any]] = []
    pulling = asyncio.create_task(ctl(head, "pull", name, timeout=180))
    while not pulling.done():
        watched += [p for p in await pulls(head) if p["state"] == "pulling"]
        await asyncio.sleep(0.3)
    code, out, err = await pulling
    assert code == 0, out + err + head.logs()[-2000:]
    assert f"{name}: done" in out and f"{name}@b: done" in out, out
    # Both progresses while it ran: the head's own and the peer's, in one pull.
    both = [p for p in watched if p["peers"] and p["peers"][0].get("done_bytes")]
    assert both, watched
    assert both[-1]["peers"][0]["node"] == "b" and both[-1]["peers"][0]["total_bytes"] > 0
    for cache in (tmp_path / "hf-a", tmp_path / "hf-b"):
        assert file_digest(snapshot_file(cache / "hub", REPO_ID, WEIGHTS)) == hub.digest(WEIGHTS), cache
        assert snapshot_file(cache / "hub", REPO_ID, "config.json").exists()
    # Each node downloaded its own copy.
    assert len(hub.downloads(WEIGHTS)) == 2
    [on_peer] = (await peer.admin("GET", "/api/pulls"))[1]["pulls"]
    assert on_peer["state"] == "done" and on_peer["model"] == name


async def test_a_peer_refuses_bad_weight_requests(sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path) -> None:
    head, peer = two_nodes(sparkd_factory, engine_image, hub, tmp_path)
    await peer.start()
    path = f"{peer.base_url}/api/worker-weights/{head.model('big')}"
    good = {"repo": REPO_ID, "hub_path": "/root/.cache/huggingface/hub", "weights_path": "/root/.cache/huggingface/hub"}
    async with aiohttp.ClientSession() as session:
        async def post(body: Any, key: str = PEER_KEY, url: str = path) -> tuple[int, Any]:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
                return response.status, await response.json()

        assert (await post({**good, "repo": "../../etc"}))[1]["error"]["code"] == "invalid_repo"
        assert (await post({**good, "hub_path": "/root/../../etc"}))[1]["error"]["code"] == "invalid_path"
        assert (await post({**good, "weights_path": "relative/dir"}))[1]["error"]["code"] == "invalid_path"
        assert (await post(good, url=f"{peer.base_url}/api/worker-weights/not-a-worker"))[0] == 404
        assert (await post(good, key=PEER_ADMIN_KEY))[0] == 403  # the peer API is for heads' peer keys
    assert not hub.requests


async def test_a_running_pull_shows_in_sparkctl_status_and_on_the_status_page(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: tests/setup/host.sh installs it")
    sparkd = sparkd_factory({"m": pulled_model(engine_image, tmp_path / "hf")}, weights_settings(hub))
    admin = "sk-test-weights-admin-0123456789ab"
    write_keys(sparkd.workdir / "keys.toml", {"ops": {"key": admin, "role": "admin"}})
    await sparkd.start()
    name = sparkd.model("m")
    hub.rate_bps = 15e6
    status, body = await sparkd.admin("POST", f"/api/models/{name}/pull")
    assert status == 202 and body["model"] == name and body["state"] == "pulling", body
    async with Browser() as browser:
        await browser.goto(sparkd.base_url + "/")
        await browser.wait_until("!document.getElementById('auth').hidden")
        await browser.evaluate(
            f"document.getElementById('auth-key').value = {json.dumps(admin)};"
            "document.getElementById('auth-form').requestSubmit()"
        )
        shown = await browser.wait_until(
            "(t => t && t.includes('/s') && t)(document.querySelector('#pulls .progress-text')?.textContent)", timeout=20,
        )
        assert shown.startswith(f"{name}: ") and " MB of 272.6 MB" in shown, shown
        assert await browser.evaluate("document.getElementById('pulls-section').hidden") is False
    code, out, _ = await ctl(sparkd, "status")
    assert code == 0 and "weights being pulled:" in out, out
    line = next(line for line in out.splitlines() if line.strip().startswith(f"{name}:") and "%" in line)
    assert " of 272.6 MB" in line and "left" in line, line


async def test_a_gated_repository_takes_the_token_from_an_owner_only_file(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    token_file = tmp_path / "hf-token"
    sparkd = sparkd_factory({"m": pulled_model(engine_image, tmp_path / "hf")}, weights_settings(hub, token_file=str(token_file)))
    await sparkd.start()
    name = sparkd.model("m")
    hub.token = "hf_test_token_0123456789"

    code, out, _ = await ctl(sparkd, "pull", name)  # no token file: the hub refuses, sparkd says what to do
    assert code == 1 and "is gated" in out and "weights.token_file" in out, out
    token_file.write_text(hub.token + "\n")
    token_file.chmod(0o644)
    code, out, _ = await ctl(sparkd, "pull", name)
    assert code == 1, out
    assert f"the hub token file {token_file} cannot be used" in out and f"chmod 600 {token_file}" in out, out
    assert hub.token not in out + sparkd.logs()
    token_file.chmod(0o600)
    code, out, _ = await ctl(sparkd, "pull", name, timeout=120)
    assert code == 0 and f"{name}: done" in out, out
    assert hub.token not in sparkd.logs()


async def test_pull_all_enabled_takes_every_enabled_model_with_weights(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    sparkd = sparkd_factory({
        "one": pulled_model(engine_image, tmp_path / "hf"),
        "off": pulled_model(engine_image, tmp_path / "hf-off", enabled=False, disabled_reason="test"),
        "plain": engine_model(engine_image),
    }, weights_settings(hub))
    await sparkd.start()
    code, out, _ = await ctl(sparkd, "pull", "--all-enabled", timeout=120)
    assert code == 0 and f"{sparkd.model('one')}: done" in out, out
    assert sparkd.model("off") not in out and sparkd.model("plain") not in out
    assert not (tmp_path / "hf-off").exists()
    code, out, err = await ctl(sparkd, "pull", sparkd.model("plain"))
    assert code == 1 and "names no hf_model" in err, out + err
    code, out, err = await ctl(sparkd, "pull")
    assert code == 2 and "--all-enabled" in err, out + err


async def test_the_start_timeout_does_not_count_the_download(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    # A pull of about 9 s at this rate, then an engine that loads in 1 s, under a start timeout of 4 s.
    sparkd = sparkd_factory(
        {"m": pulled_model(engine_image, tmp_path / "hf", start_timeout_s=4.0, env={"FAKE_LOAD_DELAY": "1"})},
        weights_settings(hub),
    )
    await sparkd.start()
    hub.rate_bps = 30e6
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        asking = asyncio.create_task(sparkd.chat(session, "m", "after the pull"))
        seen: list[dict[str, Any]] = []
        while not asking.done():
            model = await sparkd.model_status("m")
            if (model.get("progress") or {}).get("phase") == "downloading weights":
                seen.append(model)
            await asyncio.sleep(0.3)
        status, body = await asking
    took = time.monotonic() - began
    # The status shows the download as the start's stage, with an ETA from its rate.
    timed = [m for m in seen if m["eta_s"] is not None]
    assert timed and all(m["eta_s"] > m["loading_for_s"] for m in timed), seen
    assert status == 200, (body, sparkd.logs()[-2000:])
    assert took > 6.0, took  # the request did wait through the whole pull...
    [load] = [line for line in sparkd.logs().splitlines() if "event=load_finished" in line]
    assert "outcome=ready" in load  # ...and the start, timed from the container's launch, fit its 4 s
    print(f"request answered after {took:.1f} s: the pull, then {load.split('took_s=')[1].split()[0]} s of load")


async def test_a_serving_model_keeps_answering_while_another_models_weights_are_pulled(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    # m does not fit beside a: its start must evict a, but only once its weights are in.
    sparkd = sparkd_factory({
        "a": engine_model(engine_image, claim=0.6),
        "m": pulled_model(engine_image, tmp_path / "hf", claim=0.6),
    }, {**weights_settings(hub), "gpu": {"memory_budget": 0.94, "devices": []}})
    await sparkd.start()
    a, m = sparkd.model("a"), sparkd.model("m")
    async with aiohttp.ClientSession() as session:
        assert (await sparkd.chat(session, "a", "before"))[0] == 200
        hub.rate_bps = 15e6  # about 18 s for the weights
        asking = asyncio.create_task(sparkd.chat(session, "m", "after the pull"))
        answered_during_pull = 0
        pulling: list[dict[str, Any]] = []
        while not asking.done():
            status = await sparkd.status()
            by_name = {model["name"]: model for model in status["models"]}
            if by_name[m]["state"] == "pulling":
                holders = status["lease"]["holders"]
                assert m not in holders and by_name[m]["holds"] == 0.0, status["lease"]
                assert by_name[a]["state"] == "ready" and a in holders, by_name[a]
                pulling.append(by_name[m])
                code, body = await sparkd.chat(session, "a", "while m pulls")
                assert code == 200, body
                answered_during_pull += 1
            await asyncio.sleep(0.5)
        code, body = await asking
    assert code == 200, (body, sparkd.logs()[-2000:])
    progressing = [p for p in pulling if (p["progress"] or {}).get("phase") == "downloading weights" and p["eta_s"]]
    assert progressing and answered_during_pull >= 3, (answered_during_pull, pulling[-1:] or None)
    assert " of 272.6 MB" in progressing[-1]["progress"]["line"], progressing[-1]
    # Then the usual swap: a made room for m once the pull was over, not before.
    logs = sparkd.logs()
    pulled_at = logs.index(f"event=model_stopped model={m} previous=pulling")
    assert logs.index(f"event=model_draining model={a} previous=ready reason=\"making room for {m}\"") > pulled_at, logs[-3000:]
    print(f"a answered {answered_during_pull} requests while m's weights were pulled; "
          f"last pull status: {progressing[-1]['progress']['line']}, ETA {progressing[-1]['eta_s']} s")


async def test_a_daemon_stopped_mid_pull_exits_promptly_and_the_next_one_resumes(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    cache = tmp_path / "hf"
    sparkd = sparkd_factory({"m": pulled_model(engine_image, cache)}, weights_settings(hub))
    await sparkd.start()
    name = sparkd.model("m")
    hub.rate_bps = 10e6  # about 27 s for the whole file: the stop comes long before its end
    assert (await sparkd.admin("POST", f"/api/models/{name}/pull"))[0] == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [pull] = await pulls(sparkd)
        if pull["done_bytes"] > 20_000_000:
            break
        await asyncio.sleep(0.2)
    began = time.monotonic()
    assert await sparkd.stop(timeout=20) == 0
    stopped_in = time.monotonic() - began
    [partial] = (cache / "hub" / "models--test-org--smollm2-135m" / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert kept > 0
    print(f"stopped mid-pull in {stopped_in:.1f} s, {kept} bytes kept to resume")

    hub.rate_bps = None
    await sparkd.start()
    code, out, _ = await ctl(sparkd, "pull", name, timeout=120)
    assert code == 0, out
    assert hub.downloads(WEIGHTS)[-1] == f"bytes={kept}-"
    assert file_digest(snapshot_file(cache / "hub", REPO_ID, WEIGHTS)) == hub.digest(WEIGHTS)


async def test_a_two_node_model_whose_peer_lacks_its_weights_is_not_started(
    sparkd_factory: Any, engine_image: str, hub: StandInHub, tmp_path: Path,
) -> None:
    # The head's cache is filled through a single-node model of the same repository; node b's stays empty.
    head, peer = two_nodes(sparkd_factory, engine_image, hub, tmp_path,
                           head_models={"single": pulled_model(engine_image, tmp_path / "hf-a")},
                           head_lifecycle={"auto_pull": False})
    await peer.start()
    await head.start()
    assert (await ctl(head, "pull", head.model("single"), timeout=120))[0] == 0
    async with aiohttp.ClientSession() as session:
        status, body = await head.chat(session, "big")
    assert status == 503 and body["error"]["code"] == "weights_missing", body
    assert "are absent on node b and lifecycle.auto_pull is off" in body["error"]["message"], body
    assert not (tmp_path / "hf-b").exists()
    code, out, _ = await ctl(head, "pull", head.model("big"), timeout=120)
    assert code == 0 and f"{head.model('big')}@b: done" in out, out
    assert file_digest(snapshot_file(tmp_path / "hf-b" / "hub", REPO_ID, WEIGHTS)) == hub.digest(WEIGHTS)
    assert len(hub.downloads(WEIGHTS)) == 2  # the head's copy once (single), node b's once
