"""sparkctl without a daemon: output rendering, target resolution, and connection errors."""

from __future__ import annotations

import socket

import pytest

from sparkd.ctl import render, sparkctl
from sparkd.ctl.adminclient import Client, CtlError, Target


def model(**fields):
    base = {
        "name": "gpt-oss-20b", "state": "stopped", "claim": 0.8, "in_flight": 0, "queued": 0, "uptime_s": None,
        "idle_s": None, "progress": None, "eta_s": None, "loading_for_s": None, "failure": None,
    }
    base.update(fields)
    return base


def test_durations_sizes_and_bars():
    assert [render.duration(s) for s in (None, 0, 59.4, 61, 3600, 90061)] == ["-", "0s", "59s", "1m01s", "1h00m", "1d1h"]
    assert render.size(None) == "-" and render.size(512) == "512 B" and render.size(3 * 2**30) == "3.0 GiB"
    assert render.bar(0.5, width=10) == "[#####-----]  50%"
    assert render.bar(None, width=4) == "[----]   0%"
    assert render.bar(1.7, width=4) == "[####] 100%"


def test_progress_uses_the_eta_when_there_is_one():
    starting = model(state="starting", loading_for_s=30, eta_s=120, progress={"phase": "loading weights", "fraction": 0.5, "line": ""})
    assert render.progress(starting) == "[#####---------------]  25% loading weights 50%, ETA 1m30s"
    overdue = model(state="starting", loading_for_s=200, eta_s=120, progress=None)
    assert render.progress(overdue).endswith("starting, ETA 0s (overdue)") and "99%" in render.progress(overdue)


def test_progress_without_an_eta_follows_the_engine_log():
    first = model(state="starting", loading_for_s=12, progress={"phase": "loading weights", "fraction": 0.75, "line": ""})
    assert render.progress(first) == "[###############-----]  75% loading weights 75%, 12s so far"
    nothing = model(state="starting", loading_for_s=3)
    assert render.progress(nothing) == "starting, 3s so far (no ETA: first load)"
    assert render.progress(model(state="ready")) == ""
    failed = model(state="failed", failure={"message": "CUDA error", "log_lines": [], "age_s": 3})
    assert render.progress(failed) == "failed: CUDA error"


def test_status_table_lease_queue_and_failures():
    data = {
        "models": [
            model(name="a", state="ready", in_flight=2, uptime_s=125, idle_s=0),
            model(name="b", state="starting", queued=3, loading_for_s=10, eta_s=20),
            model(name="c", state="failed", failure={"message": "it died", "log_lines": ["l1", "l2"], "age_s": 4}),
        ],
        "lease": {"budget": 0.94, "claimed": 0.8, "free": 0.14, "holders": {"a": 0.8}},
        "queue": {"depth": 3, "limit": 1024, "models": ["b"]},
    }
    text = render.status(data)
    lines = text.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "CLAIM", "IN-FLIGHT", "QUEUED", "UPTIME", "IDLE", "PROGRESS"]
    assert lines[1].split()[:7] == ["a", "ready", "0.80", "2", "0", "2m05s", "0s"]
    assert "[##########----------]  50% starting, ETA 10s" in lines[2]
    assert "lease: 0.80 of 0.94 claimed (a 0.80); free 0.14" in text
    assert "queue: 3 waiting (limit 1024): b 3" in text
    assert "c failed 4s ago: it died\n  | l1\n  | l2" in text


def test_prepare_and_history_output():
    prepared = render.prepare(
        {"ok": False, "results": [
            {"model": "a", "container": "sparkd-a", "image": "img:1", "result": "created"},
            {"model": "bb", "container": "sparkd-bb", "image": "gone:1", "result": "image_missing", "message": "image gone:1 not found"},
        ]}
    )
    assert prepared.splitlines() == [
        "a      created (not started): sparkd-a (img:1)",
        "bb     IMAGE MISSING: sparkd-bb (gone:1)",
        "       image gone:1 not found",
    ]
    assert render.history({"models": {}, "sessions": [], "loads": [], "daily": [], "days": 30}) == "no history yet"


def test_target_resolution(monkeypatch, tmp_path):
    parser = sparkctl.build_parser()
    monkeypatch.delenv("SPARKD_URL", raising=False)
    monkeypatch.delenv("SPARKD_SOCKET", raising=False)
    monkeypatch.setenv("SPARKD_ADMIN_KEY", "sk-admin-key-0123456789")
    target = sparkctl.resolve_target(parser.parse_args(["--url", "http://spark:8009", "status"]))
    assert (target.url, target.key) == ("http://spark:8009", "sk-admin-key-0123456789")
    assert sparkctl.resolve_target(parser.parse_args(["status", "--socket", "/x.sock"])).socket_path == "/x.sock"
    config = tmp_path / "sparkd.toml"
    config.write_text('[server]\nruntime_dir = "/run/other"\n')
    assert sparkctl.resolve_target(parser.parse_args(["--config", str(config), "status"])).socket_path == "/run/other/sparkd.sock"
    monkeypatch.setenv("SPARKD_SOCKET", "/env.sock")
    assert sparkctl.resolve_target(parser.parse_args(["status"])).socket_path == "/env.sock"


def test_connection_errors_say_what_to_do(tmp_path):
    with pytest.raises(CtlError, match=r"no socket at .*systemctl status sparkd") as missing:
        Client(Target(socket_path=str(tmp_path / "none.sock"))).get_json("/api/status")
    assert missing.value.exit_code == 3
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()  # the file stays, nothing listens: a stale socket
    with pytest.raises(CtlError, match=r"nothing listens on .*systemctl start sparkd"):
        Client(Target(socket_path=str(stale))).get_json("/api/status")
    with pytest.raises(CtlError, match="--url must look like"):
        Client(Target(url="ftp://x"))


def test_cli_exit_codes(tmp_path, capsys):
    assert sparkctl.main(["--socket", str(tmp_path / "none.sock"), "status"]) == 3
    assert "sparkctl: cannot reach sparkd" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        sparkctl.main(["frobnicate"])
    assert usage.value.code == 2
