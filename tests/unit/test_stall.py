"""Issue 16 point 6: what counts as an engine making progress, read from vLLM's /metrics text."""

from __future__ import annotations

from sparkd.scheduler.stall import Counters, parse_counters

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1200.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 345.0
vllm:generation_tokens_total_created{engine="0",model_name="m"} 1.7e9
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0
"""


def test_counters_sum_the_engines_and_ignore_other_series():
    assert parse_counters(VLLM_METRICS) == Counters(tokens=1545.0, running=3.0)


def test_an_engine_without_vllm_counters_is_not_judged():
    assert parse_counters("# llama.cpp\nllamacpp:tokens_predicted_total 5\n") is None
    assert parse_counters("") is None


def test_unlabelled_series_and_garbage_lines():
    text = "vllm:generation_tokens_total 10\nvllm:num_requests_running 1\nvllm:prompt_tokens_total{x=\"1\"} oops\n"
    assert parse_counters(text) == Counters(tokens=10.0, running=1.0)
