"""The shipped CPU demo model answers a real prompt through sparkd (SmolLM2-135M on llama.cpp)."""

from __future__ import annotations

import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from harness import REPO

pytestmark = pytest.mark.podman


def shipped_document() -> dict:
    return tomllib.loads((REPO / "etc" / "sparkd.toml").read_text())


def shipped_demo_table() -> dict:
    return dict(shipped_document()["models"]["smollm2-135m-cpu"])


async def test_demo_model_answers_through_sparkd(sparkd_factory, cpu_demo_image):
    openai = pytest.importorskip("openai")
    table = shipped_demo_table()
    assert table["image"] == "localhost/sparkd/smollm2-cpu:latest"
    table["image"] = cpu_demo_image
    # The shipped [defaults] volumes and env too: the /models default once hid the image's GGUF (issue 12).
    shipped_defaults = shipped_document()["defaults"]
    defaults = {"volumes": shipped_defaults["volumes"], "env": shipped_defaults["env"]}
    # The shipped table under the test's model name; llama.cpp's server answers for its one model whatever the name.
    sparkd = sparkd_factory({"demo": table}, {"defaults": defaults})
    name = sparkd.model("demo")
    key = sparkd.add_user_key()  # the SDK sends some key, and only a real one passes
    await sparkd.start()
    client = openai.AsyncOpenAI(base_url=sparkd.base_url + "/v1", api_key=key, max_retries=0, timeout=300)
    chat = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=24
    )
    text = chat.choices[0].message.content
    assert text and text.strip(), chat
    stream = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces).strip()
    await client.close()
    print(f"SmolLM2 said: {text!r} / streamed: {''.join(pieces)!r}")
