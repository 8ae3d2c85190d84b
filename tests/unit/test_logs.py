"""Log lines for journald: priority prefixes, one line per event, JSON, the stdlib bridge."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import pytest
import structlog

from sparkd import logsetup


@pytest.fixture
def output(tmp_path: Path):
    path = tmp_path / "out.log"
    handle = path.open("w")
    hooks = (sys.excepthook, threading.excepthook, logging.getLogger().level)
    yield handle, path
    handle.close()
    structlog.reset_defaults()
    logging.getLogger().removeHandler(logsetup._BRIDGE)
    sys.excepthook, threading.excepthook = hooks[0], hooks[1]
    logging.getLogger().setLevel(hooks[2])


def journal_env(handle) -> dict[str, str]:
    status = os.fstat(handle.fileno())
    return {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def lines(handle, path: Path) -> list[str]:
    handle.flush()
    return path.read_text().splitlines()


def test_auto_picks_journal_only_for_the_stream_journald_gave_us(output) -> None:
    handle, _ = output
    assert logsetup.resolve_format("auto", journal_env(handle), handle) == "journal"
    assert logsetup.resolve_format("auto", {"JOURNAL_STREAM": "1:2"}, handle) == "console"  # inherited, stdout elsewhere
    assert logsetup.resolve_format("auto", {}, handle) == "console"
    assert logsetup.resolve_format("json", journal_env(handle), handle) == "json"


def test_journal_lines_carry_priorities_and_tracebacks_stay_on_one_line(output, monkeypatch) -> None:
    handle, path = output
    monkeypatch.setattr(os, "environ", {**os.environ, **journal_env(handle)})
    logsetup.configure("auto", "info", stream=handle)
    log = structlog.get_logger("test")
    log.debug("hidden")
    log.info("model_ready", model="m")
    log.warning("config_needs_restart", key="server.listen")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("request_failed")
    log.critical("uncaught")
    logging.getLogger("aiohttp.server").error("Error handling request")
    logging.getLogger("asyncio").info("not shown: libraries log warnings and above")
    got = lines(handle, path)
    assert [line[:3] for line in got] == ["<6>", "<4>", "<3>", "<2>", "<3>"], got
    assert got[0].startswith("<6>event=model_ready model=m")
    assert "Traceback" in got[2] and "ValueError: boom" in got[2]
    assert got[4].startswith('<3>event=library_log logger=aiohttp.server message="Error handling request"'), got[4]


def test_json_under_journald_keeps_the_priority_prefix_and_pure_json(output, monkeypatch) -> None:
    handle, path = output
    monkeypatch.setattr(os, "environ", {**os.environ, **journal_env(handle)})
    logsetup.configure("json", "info", stream=handle)
    structlog.get_logger("test").warning("swap_slow", model="m")
    (line,) = lines(handle, path)
    assert line.startswith("<4>{")
    record = json.loads(line[3:])
    assert record["event"] == "swap_slow" and record["level"] == "warning" and "timestamp" in record


def test_json_elsewhere_has_no_prefix(output, monkeypatch) -> None:
    handle, path = output
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    logsetup.configure("json", "info", stream=handle)
    structlog.get_logger("test").info("hello")
    (line,) = lines(handle, path)
    assert json.loads(line)["event"] == "hello"


def test_library_records_are_library_log_events_with_their_message_as_a_field(output, monkeypatch) -> None:
    handle, path = output
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    logsetup.configure("json", "info", stream=handle)
    try:
        raise OSError("socket gone")
    except OSError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    logging.getLogger("podman").warning("retrying %s", "GET /containers")
    first, second = (json.loads(line) for line in lines(handle, path))
    assert (first["event"], first["level"], first["logger"]) == ("library_log", "error", "aiohttp.server")
    assert first["message"] == "Error handling request" and "OSError: socket gone" in first["exception"]
    assert (second["event"], second["level"], second["logger"], second["message"]) == (
        "library_log", "warning", "podman", "retrying GET /containers"
    )
