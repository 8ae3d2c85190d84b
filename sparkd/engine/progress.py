"""Read load progress out of an engine's log lines (vLLM and llama.cpp servers)."""

from __future__ import annotations

import re
from dataclasses import dataclass

DOWNLOAD_PHASE = "downloading weights"
# Ordered: the first pattern that matches a line names its phase.
_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Not vLLM's config line, which names "download_dir=None" whether anything downloads or not.
    (DOWNLOAD_PHASE, re.compile(r"(?i)\bdownloading\b|fetching \d+ files|download(ed)? (weights|model)")),
    ("loading weights", re.compile(r"(?i)loading (safetensors )?checkpoint shards|loading weights|load_tensors|llama_model_load")),
    # Not "Enforce eager set, disabling torch.compile": vLLM prints that when it compiles nothing.
    ("compiling", re.compile(
        r"(?i)(?<!disabling )torch\.compile|compiling a graph|compiling model|dynamo bytecode|compiled graph"
        r"|aot compiled|warming up model for the compilation")),
    ("profiling memory", re.compile(r"(?i)memory profiling|available kv cache memory|# gpu blocks|kv cache")),
    ("capturing CUDA graphs", re.compile(r"(?i)capturing cuda graph")),
    # "Starting vLLM API server" up to vLLM 0.11, "Starting vLLM server on http://..." in 0.32.
    ("starting API server", re.compile(r"(?i)starting vllm (api )?server|uvicorn running|started server process")),
    ("ready", re.compile(r"(?i)application startup complete")),
)
_PERCENT = re.compile(r"(\d{1,3})%")
_COUNT = re.compile(r"\|\s*(\d+)/(\d+)\s")


@dataclass(frozen=True)
class LoadProgress:
    phase: str
    fraction: float | None
    """Completion of the current phase in [0, 1], when the engine printed one."""
    line: str
    eta_s: float | None = None
    """Seconds left by the step's own measure (a weights download's rate), when it has one."""

    def describe(self) -> str:
        if self.fraction is None:
            return self.phase
        return f"{self.phase} {round(self.fraction * 100)}%"


def parse_line(line: str) -> LoadProgress | None:
    """The progress a log line reports, or None when it says nothing about loading."""
    for phase, pattern in _PHASES:
        if pattern.search(line):
            return LoadProgress(phase=phase, fraction=_fraction(line), line=line[-200:])
    return None


def _fraction(line: str) -> float | None:
    count = _COUNT.search(line)
    if count and int(count.group(2)) > 0:
        return min(1.0, int(count.group(1)) / int(count.group(2)))
    percent = _PERCENT.search(line)
    if percent:
        return min(1.0, int(percent.group(1)) / 100)
    return None
