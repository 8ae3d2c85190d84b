"""The engine log lines quoted when a model fails: the cause, not the shutdown chatter after it."""

from __future__ import annotations

from sparkd.engine.lastwords import telling_lines

# The end of vLLM 0.32's log after its engine core was killed while serving.
VLLM_DEATH = [
    "(APIServer pid=1) ERROR 12-01 14:41:32 [serving.py:929]   File \"/opt/vllm/lib/python3.11/site-packages/vllm/v1/engine/core_client.py\", line 1235",
    "(APIServer pid=1) ERROR 12-01 14:41:32 [serving.py:929]     raise self._format_exception(outputs) from None",
    "(APIServer pid=1) ERROR 12-01 14:41:32 [serving.py:929] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
    "(APIServer pid=1) INFO 12-01 14:41:33 [loggers.py:335] Engine 000: Avg prompt throughput: 3.6 tokens/s, Running: 1 reqs",
    "INFO:     Shutting down",
    "INFO:     Waiting for application shutdown.",
    "INFO:     Application shutdown complete.",
    "INFO:     Finished server process [1]",
]


def test_the_lines_naming_the_error_are_quoted_not_the_polite_shutdown():
    quoted = telling_lines(VLLM_DEATH, 2)
    assert quoted == VLLM_DEATH[1:3]
    assert "EngineDeadError" in quoted[-1]


def test_without_an_error_line_the_last_lines_are_quoted():
    lines = ["INFO: loading", "INFO: Shutting down", "INFO: Finished server process [1]"]
    assert telling_lines(lines, 2) == lines[1:]
    assert telling_lines([], 5) == []


def test_sparkds_own_probes_in_the_access_log_are_never_quoted():
    # A wedged engine's log ends with sparkd's readiness and stall probes, which say nothing.
    lines = [
        "(APIServer pid=1) INFO 12-01 14:41:33 [loggers.py:335] Engine 000: Running: 1 reqs, Waiting: 0 reqs",
        'INFO:     10.88.0.1:51918 - "GET /metrics HTTP/1.1" 200 OK',
        'INFO:     10.88.0.1:51920 - "GET /health HTTP/1.1" 200 OK',
        'INFO:     10.88.0.1:51918 - "GET /metrics HTTP/1.1" 200 OK',
    ]
    assert telling_lines(lines, 2) == lines[:1]
    failed_probe = 'INFO:     10.88.0.1:51918 - "GET /health HTTP/1.1" 500 Internal Server Error'
    assert telling_lines([*lines, failed_probe], 2) == [failed_probe]  # "Error": it is the cause
