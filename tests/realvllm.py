"""The real-vLLM test image (tests/images/real_vllm) as the tests and benchmarks use it.

``image_or_skip`` gives its content-hash tag when it is built: with CI=true a
missing image fails the run (tests/run-all.sh builds it first), elsewhere the
tests that need it skip, quoting why the last build failed.
``model_table`` is a model table for it, written like a catalog entry: the
image's entrypoint (``vllm serve <its model>``) plus ``args``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import urllib.request
from typing import Any

from harness import REPO

MAX_MODEL_LEN = 4096


def build_module() -> Any:
    spec = importlib.util.spec_from_file_location("sparkd_test_images_build", REPO / "tests" / "images" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_reason(podman: Any) -> tuple[str, str | None]:
    """(the image's tag, why it cannot be used, or None when it is there)."""
    build = build_module()
    tag = build.real_vllm_tag()
    if podman.images.exists(tag):
        return tag, None
    failure = build.REAL_VLLM_FAILURE
    why = f"its last build failed:\n{failure.read_text()[-2000:]}" if failure.exists() else "it was never built here"
    return tag, f"the real-vLLM image {tag} is missing ({why}); build it with: python3 tests/images/build.py real-vllm"


def model_table(image: str, *args: str, **extra: Any) -> dict[str, Any]:
    """A model served by the real vLLM image; ``args`` come after the catalog-like ones."""
    table: dict[str, Any] = {
        "image": image,
        "args": ["--port", "8000", "--served-model-name", "{name}", "--max-model-len", str(MAX_MODEL_LEN), *args],
        "gpu": False,
        "gpu_memory": 0.0,
        "max_model_len": MAX_MODEL_LEN,
        "shm_size": "1g",
        "start_timeout_s": 600.0,
    }
    table.update(extra)
    return table


def engine_address(podman: Any, container: str) -> tuple[str, str]:
    """(127.0.0.1:<published port>, the engine's internal key) of a running model container."""
    attrs = podman.containers.get(container).attrs
    [binding] = attrs["NetworkSettings"]["Ports"]["8000/tcp"]
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    return f"127.0.0.1:{binding['HostPort']}", env["VLLM_API_KEY"]


METRIC_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)$')


def metrics(url: str) -> dict[str, float]:
    """Prometheus text at ``url`` as {"name{labels}": value} (labels as printed)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            values[match["name"] + (match["labels"] or "")] = float(match["value"])
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True)[:3000]


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"

