"""Which of an engine's last log lines say why it stopped.

A dying vLLM prints its traceback and then shuts its HTTP server down politely
("Shutting down", "Application shutdown complete", "Finished server process"):
the plain last lines of its log are that chatter, not the cause. Quoting the
last lines that name an error keeps the cause in the message a client gets.
sparkd's own probes of a serving engine (``GET /health``, ``GET /metrics`` every
few seconds) fill its access log too; those lines never say why, so they are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PROBE = re.compile(r'"GET /(health|metrics|v1/models) HTTP/1\.[01]" 200')
_CAUSE = re.compile(r"(?i)\b(error|exception|traceback|fatal|killed|out of memory|segmentation fault|died)\b|Error\b")


def telling_lines(lines: Sequence[str], count: int) -> list[str]:
    """The last ``count`` lines that name an error, in their order; the plain last lines when none does."""
    said = [line for line in lines if not _PROBE.search(line)]
    causes = [line for line in said if _CAUSE.search(line)]
    return list((causes or said)[-count:])
