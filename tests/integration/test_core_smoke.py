"""The vertical slice: a request for a stopped model starts its container and gets the engine's answer."""

from __future__ import annotations

import aiohttp
import pytest

from harness import engine_model

pytestmark = pytest.mark.podman


async def test_request_starts_stopped_model_with_labels(sparkd_factory, engine_image, podman):
    sparkd = sparkd_factory({"a": engine_model(engine_image, env={"FAKE_LOAD_DELAY": "0.5"})})
    await sparkd.start()
    assert (await sparkd.model_status("a"))["state"] == "stopped"
    async with aiohttp.ClientSession() as session:
        status, body = await sparkd.chat(session, "a", "hello world")
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].startswith("hello world")
    labels = podman.containers.get(sparkd.container("a")).labels
    assert labels["io.sparkd.managed"] == "true"
    assert labels["io.sparkd.model"] == sparkd.model("a")
    assert len(labels["io.sparkd.spec"]) == 16
