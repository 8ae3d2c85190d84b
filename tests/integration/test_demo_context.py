"""Context overflow refused before the engine, with the real CPU demo engine (issue 14, point 2).

llama-cpp-python's server has no /tokenize; the shipped demo model declares
``tokenize = "llama-cpp"`` and sparkd counts at its /extras/tokenize/count. The
engine's own access log (uvicorn's) shows which requests reached it.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import aiohttp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from harness import REPO

pytestmark = pytest.mark.podman

# ~74 KB of Python, as the OpenCode report attached: far more than SmolLM2's 8192-token context,
# even by sparkd's low estimate (~9 300 tokens; the engine counts ~37 000).
SOURCE = "".join(f"def function_{i}(argument):\n    return argument * {i} + len('text {i}')\n\n" for i in range(1300))
# ~28 KB: the low estimate (~3 500) says it may fit, the high one (~11 800) that it does not; the engine counts ~14 000.
MEDIUM = SOURCE[: len(SOURCE) * 3 // 8]


def demo_table(image: str, **changes: Any) -> dict[str, Any]:
    table = dict(tomllib.loads((REPO / "etc" / "sparkd.toml").read_text())["models"]["smollm2-135m-cpu"])
    table.pop("skip_default_volumes")  # the test daemon mounts no default volumes
    return {**table, "image": image, **changes}


def engine_requests(podman: Any, container: str, path: str) -> int:
    logs = b"".join(podman.containers.get(container).logs(stdout=True, stderr=True)).decode("utf-8", "replace")
    return len(re.findall(rf'"POST {re.escape(path)} HTTP/1\.1"', logs))


async def post_chat(session: aiohttp.ClientSession, url: str, model: str, text: str, **fields: Any) -> tuple[int, Any, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, await response.json(content_type=None), response.headers


async def test_a_prompt_that_cannot_fit_is_refused_without_starting_the_engine(sparkd_factory, cpu_demo_image, podman):
    sparkd = sparkd_factory({"demo": demo_table(cpu_demo_image)})
    await sparkd.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        status, answer, _ = await post_chat(session, sparkd.base_url, sparkd.model("demo"), SOURCE, max_tokens=64)
    assert status == 400, answer
    assert answer["error"]["code"] == "context_length_exceeded" and "low estimate" in answer["error"]["message"], answer
    assert (await sparkd.model_status("demo"))["state"] == "stopped"
    assert not podman.containers.exists(sparkd.container("demo"))  # no engine was created for it


async def test_demo_engine_counts_exactly_refuses_an_overflow_and_caps_a_fitting_prompt(sparkd_factory, cpu_demo_image, podman):
    table = demo_table(cpu_demo_image)
    assert table["tokenize"] == "llama-cpp" and table["max_model_len"] == 8192
    sparkd = sparkd_factory({"demo": table})
    await sparkd.start()
    name, container = sparkd.model("demo"), sparkd.container("demo")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        status, answer, _ = await post_chat(session, sparkd.base_url, name, MEDIUM, max_tokens=64)
        assert status == 400, answer
        error = answer["error"]
        assert error["code"] == "context_length_exceeded" and "counted by the engine" in error["message"], error
        prompt_tokens = int(re.search(r"prompt alone is (\d+) tokens", error["message"]).group(1))
        assert prompt_tokens > 8192
        assert engine_requests(podman, container, "/v1/chat/completions") == 0  # refused before the engine
        assert engine_requests(podman, container, "/extras/tokenize/count") == 1

        question = "Name three colours. " * 40
        status, answer, headers = await post_chat(session, sparkd.base_url, name, question, max_tokens=100000)
        assert status == 200, answer
        capped = dict(part.split("=") for part in headers["X-Sparkd-Max-Tokens-Capped"].split())
        assert capped["counted"] == "exact" and capped["requested"] == "100000", capped
        counted, real = int(capped["prompt_tokens"]), answer["usage"]["prompt_tokens"]
        # The text is counted by the engine's tokenizer; the chat template's tokens (SmolLM2's default
        # system prompt, the role markers) are an allowance of 32 + 8 per message.
        assert real <= counted <= real + 40, (counted, real)
        assert int(capped["sent"]) == 8192 - counted - 32  # the profile's context_margin
        assert engine_requests(podman, container, "/v1/chat/completions") == 1
    assert "tokenize_failed" not in sparkd.logs()


async def test_without_a_count_the_high_estimate_caps_and_a_failing_endpoint_is_logged_once(sparkd_factory, cpu_demo_image, podman):
    # Declared wrongly: vLLM's /tokenize, which the llama.cpp engine answers 404.
    sparkd = sparkd_factory({"demo": demo_table(cpu_demo_image, tokenize="vllm")})
    await sparkd.start()
    name, container = sparkd.model("demo"), sparkd.container("demo")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for _ in range(3):
            status, answer, headers = await post_chat(session, sparkd.base_url, name, "Say hello.", max_tokens=100000)
            assert status == 200, answer
            capped = dict(part.split("=") for part in headers["X-Sparkd-Max-Tokens-Capped"].split())
            assert capped["counted"] == "estimate", capped
            # The high estimate and its margin (max(512, 10 %)) below the context.
            assert int(capped["sent"]) == 8192 - int(capped["prompt_tokens"]) - 819, capped
        # One the low estimate lets through goes to the engine, which has the last word.
        status, answer, _ = await post_chat(session, sparkd.base_url, name, MEDIUM, max_tokens=64)
        assert status == 400, answer  # llama.cpp's own 400 (its wording), not sparkd's
        assert "maximum context length is 8192" in answer["error"]["message"] and "max_model_len" not in answer["error"]["message"]
    assert engine_requests(podman, container, "/tokenize") == 4
    assert engine_requests(podman, container, "/v1/chat/completions") == 4
    assert sparkd.logs().count("tokenize_failed") == 1, sparkd.logs()[-3000:]
