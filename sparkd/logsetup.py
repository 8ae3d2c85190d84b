"""structlog set-up: one event per line on stdout, for journald or a terminal.

Under systemd, stdout is a journald stream (``JOURNAL_STREAM`` names it): each
line starts with a ``<N>`` syslog priority prefix, which journald strips and
records, so ``journalctl -u sparkd -p warning`` filters by level.  That holds
for the ``json`` format too (for log shippers reading the journal, MESSAGE is
pure JSON).  The logfmt and JSON renderers escape newlines, so a traceback stays
inside its event's one line; records of the standard ``logging`` module
(aiohttp, asyncio, podman) and uncaught exceptions go through the same path.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

# syslog priorities journald understands as line prefixes (sd-daemon(3)).
JOURNAL_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _journal_prefix(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["_priority"] = JOURNAL_PRIORITY.get(event_dict.get("level", method), 6)
    return event_dict


class _PrefixedRenderer:
    """Wraps a renderer and puts the journald ``<N>`` prefix before its line."""

    def __init__(self, inner: Processor) -> None:
        self._inner = inner

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        priority = event_dict.pop("_priority", 6)
        line = self._inner(logger, method, event_dict)
        assert isinstance(line, str)  # the JSON and logfmt renderers it wraps render text
        return f"<{priority}>" + line


def under_journald(environ: Any = None, stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stdout) is the journald stream systemd set up for us.

    ``JOURNAL_STREAM`` is ``<device>:<inode>`` of that stream; a child process
    with its output redirected elsewhere inherits the variable but not the file.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        fd = (stream or sys.stdout).fileno()
        status = os.fstat(fd)
        device, inode = (int(part) for part in value.split(":", 1))
    except (AttributeError, OSError, ValueError):
        return True  # no file to compare with: trust the variable
    return (status.st_dev, status.st_ino) == (device, inode)


def resolve_format(format_name: str, environ: Any = None, stream: TextIO | None = None) -> str:
    if format_name == "auto":
        return "journal" if under_journald(environ, stream) else "console"
    return format_name


class _StdlibBridge(logging.Handler):
    """Hands records of the ``logging`` module to structlog (one line, same format)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            method = {logging.CRITICAL: "critical", logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "info"}.get(
                record.levelno, "debug"
            )
            # The library's prose is a field: event names stay a fixed snake_case vocabulary.
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(logger, method)("library_log", **fields)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_BRIDGE = _StdlibBridge()


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger("sparkd").critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("sparkd").critical(
        "uncaught_exception", thread=getattr(args.thread, "name", None), exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


def configure(format_name: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process (called once by the CLI, again on reload)."""
    output = stream or sys.stdout
    fmt = resolve_format(format_name, stream=output)
    journald = fmt == "journal" or (fmt == "json" and under_journald(stream=output))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True)]
        if journald:
            processors += [_journal_prefix, _PrefixedRenderer(structlog.processors.JSONRenderer())]
        else:
            processors += [structlog.processors.JSONRenderer()]
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
    # Libraries log through `logging`: warnings and errors only, in our format.
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    root.setLevel(max(logging.WARNING, LEVELS[level]))
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
