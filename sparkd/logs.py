"""structlog set-up: one event per line on stdout, for journald or a terminal.

Under systemd, stdout is a journald stream (``JOURNAL_STREAM`` is set): each line
starts with a ``<N>`` syslog priority prefix, which journald strips and records,
so ``journalctl -u sparkd -p warning`` filters by level.  The logfmt and JSON
renderers escape newlines, so a traceback stays inside its event's one line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

# syslog priorities journald understands as line prefixes (sd-daemon(3)).
JOURNAL_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _journal_prefix(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["_priority"] = JOURNAL_PRIORITY.get(method, 6)
    return event_dict


class _PrefixedRenderer:
    """Wraps a renderer and puts the journald ``<N>`` prefix before its line."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        priority = event_dict.pop("_priority", 6)
        return f"<{priority}>" + self._inner(logger, method, event_dict)


def resolve_format(format_name: str, environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if format_name == "auto":
        return "journal" if environ.get("JOURNAL_STREAM") else "console"
    return format_name


def configure(format_name: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process (called once by the CLI, again on reload)."""
    output = stream or sys.stdout
    fmt = resolve_format(format_name)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()]
    elif fmt == "journal":
        # journald stamps every line itself; the level is the prefix.
        processors += [
            _journal_prefix,
            _PrefixedRenderer(structlog.processors.LogfmtRenderer(key_order=["event"], drop_missing=True, bool_as_flag=False)),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], drop_missing=True, bool_as_flag=False),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
