"""Issue 7 acceptance b: /metrics, parsed with prometheus-client's parser, moves with requests, starts and swaps."""

from __future__ import annotations

import aiohttp
import pytest

from harness import engine_model, write_keys
from opskit import metrics, value

pytestmark = pytest.mark.podman


async def test_metrics_move_with_requests_starts_swaps_and_failures(sparkd_factory, engine_image):
    sparkd = sparkd_factory(
        {
            "a": engine_model(engine_image, claim=0.8),
            "b": engine_model(engine_image, claim=0.8),
            "x": engine_model(engine_image, claim=0.1, env={"FAKE_CRASH_AT_START": "1"}),
        },
        {"gpu": {"memory_budget": 0.94}},
    )
    a, b, x = sparkd.model("a"), sparkd.model("b"), sparkd.model("x")
    # /metrics is the admin API: scraped over TCP with an admin key, as Prometheus does.
    sparkd.admin_key = "sk-test-metrics-admin-0123456789abcdef"
    write_keys(sparkd.workdir / "keys.toml", {"scraper": {"key": sparkd.admin_key, "role": "admin"}})
    await sparkd.start()
    before = await metrics(sparkd)
    assert value(before, "sparkd_container_starts_total", model=a) == 0
    assert value(before, "sparkd_model_state", model=a, state="stopped") == 1
    assert value(before, "sparkd_lease_budget_ratio") == 0.94
    assert value(before, "sparkd_host_memory_available_bytes") > 0
    assert value(before, "sparkd_info", version=__import__("sparkd").__version__) == 1

    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "a", "one two three")
        assert status == 200
        stream = {"model": a, "messages": [{"role": "user", "content": "four five"}], "stream": True,
                  "stream_options": {"include_usage": True}}
        async with session.post(sparkd.base_url + "/v1/chat/completions", json=stream) as response:
            assert response.status == 200
            await response.read()
        async with session.post(sparkd.base_url + "/v1/chat/completions", json={"model": "nope", "messages": []}) as response:
            assert response.status == 404
        after_a = await metrics(sparkd)
        assert value(after_a, "sparkd_requests_total", model=a, status="200") == 2
        assert value(after_a, "sparkd_requests_total", model="(none)", status="404") == 1
        assert value(after_a, "sparkd_request_duration_seconds_count", model=a) == 2
        assert value(after_a, "sparkd_time_to_first_byte_seconds_count", model=a) == 2
        prompt = value(after_a, "sparkd_tokens_total", model=a, kind="prompt")
        completion = value(after_a, "sparkd_tokens_total", model=a, kind="completion")
        assert prompt >= body["usage"]["prompt_tokens"] + 1 and completion >= body["usage"]["completion_tokens"] + 1
        assert value(after_a, "sparkd_container_starts_total", model=a) == 1
        assert value(after_a, "sparkd_model_load_duration_seconds_count", model=a, kind="start") == 1
        assert value(after_a, "sparkd_model_state", model=a, state="ready") == 1
        assert value(after_a, "sparkd_lease_share_ratio", model=a) == pytest.approx(0.8)
        assert value(after_a, "sparkd_requests_in_flight", model=a) == 0

        assert (await sparkd.chat(session, "b"))[0] == 200  # swaps a out
        swapped = await metrics(sparkd)
        assert value(swapped, "sparkd_swaps_total", model=a, for_model=b) == 1
        assert value(swapped, "sparkd_container_stops_total", model=a) == 1
        assert value(swapped, "sparkd_container_starts_total", model=b) == 1
        assert value(swapped, "sparkd_lease_claimed_ratio") == pytest.approx(0.8)

        assert (await sparkd.chat(session, "x"))[0] == 503
        failed = await metrics(sparkd)
        assert value(failed, "sparkd_container_failures_total", model=x) == 1
        assert value(failed, "sparkd_requests_total", model=x, status="503") == 1
        assert value(failed, "sparkd_model_state", model=x, state="failed") == 1
