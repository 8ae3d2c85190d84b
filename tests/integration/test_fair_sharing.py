"""Issue 17 acceptance a and c: one GPU shared fairly between keys, on real Podman with the test engine.

Usage per key name matches the tokens the engine reported (history, ``sparkctl usage`` over the
admin socket and over HTTP with an admin key, ``/metrics``, the status page's data); the keys'
``max_concurrent`` and ``tokens_per_day`` refuse with their documented codes and free up again;
a higher-priority waiter gets the GPU first at a swap; the swap quantum keeps a just-loaded model
through a burst of requests for the other model.  The pure logic: tests/unit/test_fair_sharing_logic.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import aiohttp
import pytest

from harness import Sparkd, container_events, engine_model, write_keys
from opskit import CHROMIUM, Browser, ctl, run_ctl

pytestmark = pytest.mark.podman

BUDGET = {"gpu": {"memory_budget": 0.94}}
ADMIN = "sk-test-fair-admin-0123456789abcdef"
ALICE = "sk-test-fair-alice-0123456789abcdef"
BOB = "sk-test-fair-bob-00123456789abcdef"


async def chat(session: aiohttp.ClientSession, sparkd: Sparkd, model: str, key: str, text: str = "hello") -> tuple[int, Any, Any]:
    """(status, JSON body, headers) of one chat completion sent with ``key``."""
    body = {"model": sparkd.model(model), "messages": [{"role": "user", "content": text}]}
    async with session.post(
        sparkd.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json(content_type=None), response.headers


async def stream_chat(session: aiohttp.ClientSession, sparkd: Sparkd, model: str, key: str) -> int:
    """Status of one streamed chat completion, read to its end (the engine's token_rate paces it)."""
    body = {"model": sparkd.model(model), "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with session.post(
        sparkd.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        await response.read()
        return response.status


async def live_status(sparkd: Sparkd) -> dict[str, Any]:
    """The first status event of /api/events: what the status page renders."""
    async with sparkd.admin_session() as session, session.get(sparkd.admin_url + "/api/events") as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                return json.loads(line[6:])
    raise AssertionError("no status event")


async def test_usage_per_key_matches_the_tokens_the_engine_reported(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image), "b": engine_model(engine_image)})
    write_keys(sparkd.workdir / "keys.toml", {
        "ops": {"key": ADMIN, "role": "admin"}, "alice": {"key": ALICE}, "bob": {"key": BOB},
    })
    await sparkd.start()
    reported: dict[tuple[str, str], list[int]] = {}
    async with aiohttp.ClientSession() as session:
        for name, key, model, text in [
            ("alice", ALICE, "a", "one two three"), ("alice", ALICE, "a", "four"), ("alice", ALICE, "b", "five six"),
            ("bob", BOB, "a", "seven eight nine ten eleven"),
        ]:
            status, body, _ = await chat(session, sparkd, model, key, text)
            assert status == 200, body
            counts = reported.setdefault((name, sparkd.model(model)), [0, 0, 0])
            counts[0] += 1
            counts[1] += body["usage"]["prompt_tokens"]
            counts[2] += body["usage"]["completion_tokens"]
        async with session.post(  # an error counts for its key too
            sparkd.base_url + "/v1/chat/completions", json={"model": sparkd.model("a"), "messages": "nope"},
            headers={"Authorization": f"Bearer {BOB}"},
        ) as response:
            assert response.status == 400

    def rows_of(doc: dict[str, Any]) -> dict[tuple[str, str], list[int]]:
        return {(r["key"], r["model"]): [r["requests"], r["prompt_tokens"], r["completion_tokens"]] for r in doc["rows"]}

    # Over the admin socket, keyless (its file mode decides).
    code, out, err = await ctl(sparkd, "usage", "--json")
    assert code == 0, err
    doc = json.loads(out)
    rows = rows_of(doc)
    assert rows[("alice", sparkd.model("a"))] == reported[("alice", sparkd.model("a"))]
    assert rows[("alice", sparkd.model("b"))] == reported[("alice", sparkd.model("b"))]
    bob_a = rows[("bob", sparkd.model("a"))]
    assert bob_a[0] == 2 and bob_a[1:] == reported[("bob", sparkd.model("a"))][1:]
    assert next(r for r in doc["rows"] if r["key"] == "bob")["errors"] == 1
    assert all(r["queue_wait_s"] >= 0 for r in doc["rows"])

    # Over HTTP with an admin key, filtered; a user key is refused.
    admin_env = {"SPARKD_ADMIN_KEY": ADMIN}
    code, out, err = await run_ctl("--url", sparkd.base_url, "usage", "--key", "alice", "--model", sparkd.model("a"),
                                   "--days", "1", "--json", env=admin_env)
    assert code == 0, err
    assert rows_of(json.loads(out)) == {("alice", sparkd.model("a")): reported[("alice", sparkd.model("a"))]}
    code, out, err = await run_ctl("--url", sparkd.base_url, "usage", env=admin_env)
    assert code == 0, err
    assert "KEY" in out and "alice" in out and "bob" in out and "QUEUE WAIT" in out
    code, _, err = await run_ctl("--url", sparkd.base_url, "usage", env={"SPARKD_ADMIN_KEY": ALICE})
    assert code == 1 and "(403)" in err
    code, _, err = await ctl(sparkd, "usage", "--key", "no such key!")
    assert code == 1 and "key name" in err

    # /metrics: series by key name, for the names of the keys file only.
    async with sparkd.admin_session() as session, session.get(sparkd.admin_url + "/metrics") as response:
        metrics = await response.text()
    prompt = reported[("alice", sparkd.model("a"))][1]
    assert f'sparkd_key_tokens_total{{key="alice",kind="prompt",model="{sparkd.model("a")}"}} {float(prompt)}' in metrics
    assert f'sparkd_key_requests_total{{key="bob",model="{sparkd.model("a")}",outcome="error"}} 1.0' in metrics

    # The status page's data: today's usage per key.
    today = {(r["key"], r["model"]): r for r in (await live_status(sparkd))["usage_today"]}
    assert today[("alice", sparkd.model("b"))]["completion_tokens"] == reported[("alice", sparkd.model("b"))][2]

    # The history holds names, never keys; a restart keeps today's counts.
    await sparkd.stop()
    database = sparkd.workdir / "state" / "history.sqlite3"
    with sqlite3.connect(database) as db:
        dumped = "\n".join(db.iterdump())
    assert "alice" in dumped and ALICE not in dumped and BOB not in dumped and ADMIN not in dumped
    await sparkd.start()
    code, out, _ = await ctl(sparkd, "usage", "--json", "--key", "alice")
    assert rows_of(json.loads(out))[("alice", sparkd.model("b"))] == reported[("alice", sparkd.model("b"))]


@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: tests/setup/host.sh installs it")
async def test_the_status_page_shows_todays_usage_per_key(sparkd_factory, engine_image):
    sparkd = sparkd_factory({"a": engine_model(engine_image)})
    write_keys(sparkd.workdir / "keys.toml", {"ops": {"key": ADMIN, "role": "admin"}, "alice": {"key": ALICE}})
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        status, body, _ = await chat(session, sparkd, "a", ALICE, "count my tokens")
        assert status == 200
    async with Browser() as browser:
        await browser.goto(sparkd.base_url + "/")
        await browser.wait_until("!document.getElementById('auth').hidden")
        await browser.evaluate(
            f"document.getElementById('auth-key').value = {json.dumps(ADMIN)};"
            "document.getElementById('auth-form').requestSubmit()"
        )
        cells = await browser.wait_until(
            "(r => r && [...r.cells].map(c => c.textContent))(document.querySelector('#usage-rows tr[data-key=\"alice\"]'))"
        )
        assert cells[:4] == ["alice", sparkd.model("a"), "1", "0"], cells
        assert cells[4:6] == [str(body["usage"]["prompt_tokens"]), str(body["usage"]["completion_tokens"])], cells
        swap_text = await browser.evaluate("document.getElementById('swap-text').textContent")
        assert "policy quantum" in swap_text and "swap_cost_factor 4" in swap_text, swap_text


async def test_max_concurrent_and_tokens_per_day_refuse_with_their_codes_and_free_up(sparkd_factory, engine_image):
    sparkd = sparkd_factory({
        "slow": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "3"}),
        "a": engine_model(engine_image),
    })
    keys_file = sparkd.workdir / "keys.toml"
    keys = {"ops": {"key": ADMIN, "role": "admin"}, "alice": {"key": ALICE, "max_concurrent": 1},
            "bob": {"key": BOB, "tokens_per_day": 30}}
    write_keys(keys_file, keys)
    sparkd.admin_key = ADMIN
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        # max_concurrent counts a request that waits for its model (a cold start) too.
        first = asyncio.create_task(chat(session, sparkd, "slow", ALICE))
        await sparkd.wait_state("slow", "starting")
        status, body, headers = await chat(session, sparkd, "a", ALICE)
        assert status == 429 and body["error"]["code"] == "key_max_concurrent", body
        assert "max_concurrent" in body["error"]["message"] and "Retry-After" in headers
        assert (await chat(session, sparkd, "a", BOB))[0] == 200  # another key is not held back
        assert (await first)[0] == 200
        assert (await chat(session, sparkd, "a", ALICE))[0] == 200  # its place is free again

        # tokens_per_day: past it, 429 until midnight, naming the limit.
        while True:
            status, body, headers = await chat(session, sparkd, "a", BOB, "spend some tokens")
            if status != 200:
                break
        assert status == 429 and body["error"]["code"] == "key_tokens_per_day", body
        assert "tokens_per_day" in body["error"]["message"] and body["error"]["tokens_per_day"] == 30
        now = time.localtime()
        midnight = time.mktime((now.tm_year, now.tm_mon, now.tm_mday + 1, 0, 0, 0, 0, 0, -1))
        assert abs(int(headers["Retry-After"]) - (midnight - time.time())) < 10
        assert (await chat(session, sparkd, "a", ALICE))[0] == 200  # alice has no token limit

        # A reload applies new limits at once (the day's count stays).
        keys["bob"]["tokens_per_day"] = 100000
        keys["alice"]["max_concurrent"] = 0  # refused: the reload keeps the running keys
        write_keys(keys_file, keys)
        sparkd.reload()
        await asyncio.sleep(1)
        assert "keys.alice.max_concurrent: expected a whole number of at least 1, found 0" in sparkd.logs()
        assert (await chat(session, sparkd, "a", BOB))[0] == 429
        keys["alice"]["max_concurrent"] = 1
        write_keys(keys_file, keys)
        sparkd.reload()
        for _ in range(100):
            if (await chat(session, sparkd, "a", BOB))[0] == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the reloaded tokens_per_day did not apply")


async def test_a_higher_priority_waiter_is_served_first_at_a_swap(sparkd_factory, engine_image, podman):
    slow = {"FAKE_TOKEN_RATE": "10", "FAKE_TOKENS": "20"}  # a streamed answer of 2 s holds the GPU
    sparkd = sparkd_factory(
        {"a": engine_model(engine_image, claim=0.8, env=slow), "b": engine_model(engine_image, claim=0.8),
         "c": engine_model(engine_image, claim=0.8)},
        {**BUDGET, "lifecycle": {"swap_cost_factor": 0}},
    )
    write_keys(sparkd.workdir / "keys.toml", {
        "ops": {"key": ADMIN, "role": "admin"}, "guest": {"key": ALICE, "priority": 0},
        "family": {"key": BOB, "priority": 10},
    })
    sparkd.admin_key = ADMIN
    await sparkd.start()
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, sparkd, "a", ALICE))[0] == 200
        since = time.time()
        holder = asyncio.create_task(stream_chat(session, sparkd, "a", ALICE))
        await asyncio.sleep(0.3)
        done: list[str] = []

        async def wait_for(model: str, key: str) -> None:
            assert (await chat(session, sparkd, model, key))[0] == 200
            done.append(model)

        guest = asyncio.create_task(wait_for("b", ALICE))  # came first, priority 0
        for _ in range(50):
            if (await sparkd.status())["queue"]["depth"]:
                break
            await asyncio.sleep(0.05)
        family = asyncio.create_task(wait_for("c", BOB))  # came second, priority 10
        for _ in range(50):
            queue = (await sparkd.status())["queue"]
            if queue["depth"] == 2:
                break
            await asyncio.sleep(0.05)
        assert queue["models"] == [sparkd.model("c"), sparkd.model("b")], queue
        assert (await sparkd.model_status("a"))["state"] in ("ready", "draining")
        assert (await holder) == 200
        await asyncio.gather(guest, family)
    assert done == ["c", "b"]
    starts = [model for _, action, model in container_events(podman, since, sparkd.prefix, {"start"})]
    assert starts.index(sparkd.model("c")) < starts.index(sparkd.model("b")), starts


async def run_burst(sparkd: Sparkd, answers_of_a: int) -> tuple[list[int], list[int], list[str]]:
    """One client sends ``answers_of_a`` requests for a one after another; after its first answer
    a burst of three requests for b arrives. (statuses of a, statuses of b, a's state seen meanwhile)."""
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, sparkd, "b", ADMIN))[0] == 200  # b holds the GPU: a is swapped in next
        assert (await chat(session, sparkd, "a", ADMIN))[0] == 200
        burst = [asyncio.create_task(chat(session, sparkd, "b", ADMIN)) for _ in range(3)]
        seen, statuses_a = [], []
        for _ in range(answers_of_a):
            statuses_a.append((await chat(session, sparkd, "a", ADMIN))[0])
            seen.append((await sparkd.model_status("a"))["state"])
        statuses_b = [status for status, _, _ in await asyncio.gather(*burst)]
    return statuses_a, statuses_b, seen


async def test_the_quantum_keeps_a_just_loaded_model_through_a_burst_for_the_other(sparkd_factory, engine_image, podman):
    models = {"a": engine_model(engine_image, claim=0.8), "b": engine_model(engine_image, claim=0.8)}
    # The quantum is max(min_uptime_s, 4 x load): far longer than the client's run of requests.
    sparkd = sparkd_factory(models, {**BUDGET, "lifecycle": {"min_uptime_s": 120}})
    write_keys(sparkd.workdir / "keys.toml", {"ops": {"key": ADMIN, "role": "admin"}})
    sparkd.admin_key = ADMIN
    await sparkd.start()
    since = time.time()
    statuses_a, statuses_b, seen = await run_burst(sparkd, 8)
    assert statuses_a == [200] * 8 and statuses_b == [200] * 3
    assert set(seen) == {"ready"}, seen  # never drained for b while its client kept it busy
    events = container_events(podman, since, sparkd.prefix, {"start"})
    starts = [model for _, action, model in events]
    assert starts.count(sparkd.model("a")) == 1, starts  # one load of a for all its requests
    status = await sparkd.status()
    assert status["swap"] == {"policy": "quantum", "cost_factor": 4.0, "min_uptime_s": 120.0}
    b_status = next(m for m in status["models"] if m["name"] == sparkd.model("b"))
    assert b_status["quantum_s"] == 120.0 and b_status["quantum_left_s"] is not None  # b swapped in for the burst
    code, out, _ = await ctl(sparkd, "status")
    assert code == 0 and "swaps: policy quantum, swap_cost_factor 4" in out and f"{sparkd.model('b')} keeps the GPU" in out
    await sparkd.stop()

    # The same run under the policy before the quantum: the burst evicts a at once.
    fifo = sparkd_factory(models, {**BUDGET, "lifecycle": {"min_uptime_s": 120, "swap_policy": "fifo"}}, name="fifo")
    write_keys(fifo.workdir / "keys.toml", {"ops": {"key": ADMIN, "role": "admin"}})
    fifo.admin_key = ADMIN
    await fifo.start()
    since = time.time()
    statuses_a, statuses_b, seen = await run_burst(fifo, 8)
    assert statuses_a == [200] * 8 and statuses_b == [200] * 3
    starts = [model for _, action, model in container_events(podman, since, fifo.prefix, {"start"})]
    assert starts.count(fifo.model("a")) >= 2, starts
    assert (await fifo.status())["swap"]["policy"] == "fifo"
