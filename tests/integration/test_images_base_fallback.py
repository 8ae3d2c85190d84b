"""`sparkd images build` where no container registry answers (issue 12): the recipe's base
image cannot be pulled, so sparkd makes an equivalent Debian base from the package mirror
with debootstrap, imports it into Podman and builds on it; a second build reuses it.

A stand-in recipe under the smollm2-cpu name (its runtime base only, so one debootstrap
of about a minute), built with --tag under a test name: the demo image is not touched.
The mirror is named with a trailing slash: the same Debian mirror, but a base tag of
the test's own, so the demo image's base (made the same way by tests/images/cpu_demo.py)
is neither reused nor removed. Needs root, debootstrap and the Debian mirror.

Then the real thing, as a user runs it: `python -m sparkd images build smollm2-cpu
--tag <a test name>` with the shipped recipe on this registry-less, proxied host, and
the image it makes answers a chat through sparkd with the shipped demo model's table.
The suite's demo image (tests/images/cpu_demo.py) is built by the same function right
before, so Podman's layer cache holds every step and this build takes seconds, not the
~10 min of compiling llama.cpp; CI's fresh run compiles it once, in that same code path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from harness import REPO, Sparkd
from sparkd.imagerecipes import recipe_named
from sparkd.localbase import DEFAULT_MIRROR, MIRROR_ENV

pytestmark = pytest.mark.podman


MIRROR = os.environ.get("SPARKD_DEBIAN_MIRROR", DEFAULT_MIRROR).rstrip("/") + "/"


def build(config: Path, recipes: Path, tag: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparkd", "images", "build", "smollm2-cpu", "--config", str(config),
         "--containerfiles", str(recipes), "--tag", tag],
        capture_output=True, text=True, timeout=900, env={**os.environ, MIRROR_ENV: MIRROR}, check=False,
    )


def test_a_base_no_registry_serves_is_made_from_the_debian_mirror(tmp_path: Path, podman: Any) -> None:
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing: run tests/setup/host.sh as root")
    recipe = recipe_named("smollm2-cpu")
    assert recipe is not None
    runtime = next(b for b in recipe.debian_bases if b.build_arg == "BASE_IMAGE")
    if podman.images.exists(runtime.registry_image):
        pytest.skip(f"{runtime.registry_image} is present here: nothing to fall back from")
    base_tag = runtime.tag(MIRROR)
    if podman.images.exists(base_tag):
        podman.images.remove(base_tag)  # left by an interrupted run of this test: make it again
    recipes = tmp_path / "containerfiles"
    (recipes / "smollm2-cpu").mkdir(parents=True)
    (recipes / "smollm2-cpu" / "Containerfile").write_text(
        f"ARG BASE_IMAGE={runtime.registry_image}\nFROM ${{BASE_IMAGE}}\n"
        "RUN python3 -c 'import venv, ssl; print(\"runtime-base-ok\")'\n"
    )
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\n')
    tag = f"localhost/sparkd-test/base-fallback:{uuid.uuid4().hex[:8]}"
    try:
        first = build(config, recipes, tag)
        print(first.stdout[-4000:], first.stderr[-2000:])
        if "could not pull" not in first.stdout and first.returncode == 0:
            pytest.skip("a container registry answers here: the fallback is not needed")
        assert first.returncode == 0, first.stderr
        assert f"could not pull {runtime.registry_image}" in first.stdout
        assert "making an equivalent Debian base from the package mirror instead" in first.stdout
        # The long steps show their progress.
        assert f"[base {runtime.name}]" in first.stdout and "debootstrap bookworm" in first.stdout
        assert f"imported as {base_tag}" in first.stdout
        assert "runtime-base-ok" in first.stdout and f"built {tag}" in first.stdout
        assert podman.images.exists(tag) and podman.images.exists(base_tag)

        second = build(config, recipes, tag)
        assert second.returncode == 0, second.stderr
        assert f"using {base_tag}, made earlier from the Debian mirror" in second.stdout
        assert "debootstrap" not in second.stdout
    finally:
        for image in (tag, base_tag):
            if podman.images.exists(image):
                podman.images.remove(image, force=True)


def test_tag_names_one_recipe(tmp_path: Path) -> None:
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sparkd", "images", "build", "smollm2-cpu", "vllm-gb10", "--config", str(config), "--tag", "localhost/x:y"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "--tag names the image of one recipe; 2 recipes were asked for" in result.stderr


@pytest.fixture
def cli_tag(podman: Any) -> Iterator[str]:
    """A test name for the image; removed after the test's daemons and containers are gone
    (requested before sparkd_factory, so torn down after it)."""
    tag = f"localhost/sparkd-test/smollm2-cli:{uuid.uuid4().hex[:8]}"
    yield tag
    if podman.images.exists(tag):
        # Its layers are the demo image's: only this name goes.
        podman.images.remove(tag)


async def test_sparkd_images_build_smollm2_cpu_here_makes_an_image_that_answers(
    tmp_path: Path, podman: Any, cpu_demo_image: str, cli_tag: str, sparkd_factory: Callable[..., Sparkd]
) -> None:
    openai = pytest.importorskip("openai")
    config = tmp_path / "sparkd.toml"
    config.write_text('[models.m]\nimage = "x"\n')
    tag = cli_tag
    started = time.monotonic()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sparkd", "images", "build", "smollm2-cpu", "--config", str(config), "--tag", tag],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path, check=False,
    )
    seconds = time.monotonic() - started
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0, result.stderr
    assert f"built {tag}" in result.stdout
    assert "pip in the builder stage trusts" in result.stdout or "uses its own CA list" in result.stdout
    cached = result.stdout.count("Using cache")
    # The compile came from the layer cache the demo image's build left (the same code, the
    # same inputs): a build that cannot reuse layers costs users a full rebuild every time.
    lines = result.stdout.splitlines()
    compile_step = next(i for i, line in enumerate(lines) if "STEP" in line and "pip wheel" in line)
    assert lines[compile_step + 1].startswith("--> Using cache"), lines[compile_step : compile_step + 3]
    same = podman.images.get(tag).id == podman.images.get(cpu_demo_image).id
    print(f"`sparkd images build smollm2-cpu` took {seconds:.1f} s ({cached} steps from Podman's layer cache; "
          f"{'the same image as' if same else 'another image than'} the suite's {cpu_demo_image})")

    shipped = tomllib.loads((REPO / "etc" / "sparkd.toml").read_text())
    table = dict(shipped["models"]["smollm2-135m-cpu"])
    table["image"] = tag
    # The shipped table with the shipped [defaults] it refers to (volumes it leaves out, env).
    defaults = {"volumes": shipped["defaults"]["volumes"], "env": shipped["defaults"]["env"]}
    sparkd = sparkd_factory({"demo": table}, {"defaults": defaults})
    key = sparkd.add_user_key()
    await sparkd.start()
    client = openai.AsyncOpenAI(base_url=sparkd.base_url + "/v1", api_key=key, max_retries=0, timeout=300)
    chat = await client.chat.completions.create(
        model=sparkd.model("demo"), messages=[{"role": "user", "content": "Name a colour."}], max_tokens=24
    )
    await client.close()
    text = chat.choices[0].message.content
    assert text and text.strip() and chat.usage and chat.usage.completion_tokens > 0, chat
    print(f"the image `sparkd images build` made answered: {text!r}")
