"""README.md's quick start, read from README.md itself so the README and its tests cannot drift."""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness import REPO

FENCE = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class QuickStart:
    commands: tuple[str, ...]
    """The install and the test command, each as written (comments dropped)."""
    curl_example: str
    """The first curl example block, verbatim (it sets KEY, then calls curl)."""


def quick_start() -> QuickStart:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    blocks = FENCE.findall(match.group(1))
    assert len(blocks) >= 2, f"the quick start should hold the commands and a curl example; found {len(blocks)} sh block(s)"
    commands = tuple(_without_comment(line) for line in blocks[0].splitlines() if line.strip())
    curl_blocks = [block for block in blocks[1:] if re.search(r"^\s*curl ", block, re.M)]
    assert curl_blocks, "the quick start has no curl example"
    return QuickStart(commands=commands, curl_example=curl_blocks[0])


def _without_comment(line: str) -> str:
    # The quick start's commands carry trailing `# ...` explanations and no quoted '#'.
    return line.split(" #", 1)[0].strip()
