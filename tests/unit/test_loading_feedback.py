"""What a stream that waits for its model is told (issue 14 point 4): the text, its SSE shapes, the settings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import write_keys
from sparkd.config import ConfigError, ModelConfig, load_config
from sparkd.config.keys import KeysFileError
from sparkd.engine.progress import LoadProgress, parse_line
from sparkd.errors import GatewayTimeout, ServiceUnavailable
from sparkd.http.auth import KeyRing
from sparkd.http.loading import (
    AnthropicAfterLoading,
    HolderView,
    WaitView,
    anthropic_opening,
    comment_line,
    describe_wait,
    failure_event,
    feedback_event,
    wait_view,
)
from sparkd.scheduler.runner import ModelRunner
from sparkd.scheduler.state import ModelState as S

WEIGHTS = LoadProgress(phase="loading weights", fraction=0.45, line="Loading safetensors checkpoint shards: 45%")


@pytest.mark.parametrize(
    ("view", "text"),
    [
        (WaitView("gpt-oss-120b", S.STARTING, WEIGHTS, busy_for_s=15.2, usual_load_s=95.0),
         "sparkd: loading gpt-oss-120b, loading weights 45%, about 80 s left"),
        (WaitView("m", S.STARTING, WEIGHTS, busy_for_s=12.4, usual_load_s=None), "sparkd: loading m, loading weights 45%, 12 s so far"),
        (WaitView("m", S.STARTING, None, busy_for_s=1.0, usual_load_s=None), "sparkd: loading m, starting its container, 1 s so far"),
        (WaitView("m", S.STARTING, LoadProgress("compiling", None, ""), busy_for_s=100.0, usual_load_s=95.0),
         "sparkd: loading m, compiling, taking longer than its usual 95 s"),
        (WaitView("m", S.STARTING, None, busy_for_s=60.0, usual_load_s=600.0), "sparkd: loading m, starting its container, about 9 min left"),
        (WaitView("m", S.WAKING, busy_for_s=3.0, usual_load_s=95.0), "sparkd: waking m from sleep, 3 s so far"),
        (WaitView("m", S.STOPPED, holders=(HolderView("big", S.DRAINING, 2),)), "sparkd: m is queued, waiting for big to finish 2 requests in flight"),
        (WaitView("m", S.SLEEPING, holders=(HolderView("big", S.STOPPING, 0), HolderView("u", S.READY, 0))),
         "sparkd: m is queued, waiting for big to stop, u to free the GPU"),
        (WaitView("m", S.STOPPED, holders=(HolderView("x", S.STARTING, 0),)), "sparkd: m is queued, waiting for x to finish loading"),
        (WaitView("m", S.STOPPED), "sparkd: m is queued, starting soon"),
        (WaitView("m", S.DRAINING), "sparkd: m is handing the GPU to another model; this request waits for its next turn"),
        (WaitView("m", S.STOPPING), "sparkd: waiting for m to stop before it starts again"),
        (WaitView("m", S.READY), "sparkd: m is ready"),
    ],
)
def test_the_wait_is_described_with_its_stage_and_an_eta_only_when_one_was_measured(view, text):
    assert describe_wait(view) == text


def test_the_stage_comes_from_the_engine_log_parser():
    progress = parse_line("Loading safetensors checkpoint shards:  50% Completed | 2/4 [00:02<00:02, 1.00s/it]")
    assert progress is not None
    assert describe_wait(WaitView("m", S.STARTING, progress, busy_for_s=2.0)) == "sparkd: loading m, loading weights 50%, 2 s so far"


def runner(name: str, state: S, **fields) -> ModelRunner:
    made = ModelRunner(config=ModelConfig(name=name, image="i"), spec=None)  # wait_view never reads the spec
    made.state = state
    for key, value in fields.items():
        setattr(made, key, value)
    return made


def test_wait_view_reads_state_progress_eta_and_the_holders_of_the_gpu():
    loading = runner("m", S.STARTING, progress=WEIGHTS, start_requested_at=1000.0)
    holder = runner("big", S.DRAINING, in_flight=3)
    scheduler = SimpleNamespace(
        runners={"m": loading, "big": holder},
        lease=SimpleNamespace(holders={"m": 0.5, "big": 0.4}),
        lifecycle=SimpleNamespace(load_times=SimpleNamespace(eta=lambda name: 95.0 if name == "m" else None)),
    )
    view = wait_view(scheduler, "m", now_wall=1015.0)
    assert view == WaitView("m", S.STARTING, WEIGHTS, busy_for_s=15.0, usual_load_s=95.0, holders=(HolderView("big", S.DRAINING, 3),),
                            container_running=False)
    loading.started_at = 1001.0  # its container runs: the start can no longer fail for want of an image
    assert wait_view(scheduler, "m", now_wall=1015.0).container_running
    assert wait_view(scheduler, "big", now_wall=1015.0).container_running  # not starting at all
    assert wait_view(scheduler, "gone", now_wall=0.0) == WaitView("gone", S.STOPPED)
    assert (loading.state, loading.in_flight, holder.in_flight) == (S.STARTING, 0, 3)  # read, never changed


def test_a_comment_is_one_sse_comment_line():
    assert comment_line("sparkd: loading m") == b": sparkd: loading m\n\n"


def data(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:])


def test_feedback_deltas_in_the_shapes_the_sdks_parse():
    chat = data(feedback_event("/v1/chat/completions", "reasoning", "m", "sparkd: loading m\n", "chatcmpl-x"))
    assert chat["object"] == "chat.completion.chunk" and chat["model"] == "m" and chat["id"] == "chatcmpl-x"
    assert chat["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "sparkd: loading m\n"}
    assert chat["choices"][0]["finish_reason"] is None
    content = data(feedback_event("/v1/chat/completions", "content", "m", "t\n", "chatcmpl-x"))
    assert content["choices"][0]["delta"] == {"role": "assistant", "content": "t\n"}
    completion = data(feedback_event("/v1/completions", "content", "m", "t\n", "cmpl-x"))
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "t\n"


def test_feedback_off_or_without_a_channel_is_comments_only():
    assert feedback_event("/v1/chat/completions", "off", "m", "t", "i") is None
    assert feedback_event("/v1/completions", "reasoning", "m", "t", "i") is None  # completions have no reasoning channel
    assert feedback_event("/v1/responses", "content", "m", "t", "i") is None


def test_failures_after_the_headers_are_the_routes_error_events():
    openai_event = data(failure_event("/v1/chat/completions", GatewayTimeout("model m was not ready", code="queue_timeout")))
    assert openai_event == {"error": {"message": "model m was not ready", "type": "server_error", "param": None, "code": "queue_timeout"}}
    anthropic_event = failure_event("/v1/messages", ServiceUnavailable("model m failed", code="model_failed"))
    assert anthropic_event.startswith(b"event: error\ndata: ")
    body = json.loads(anthropic_event.split(b"data: ", 1)[1])
    assert body == {"type": "error", "error": {"type": "overloaded_error", "message": "model m failed", "code": "model_failed"}}


MODEL = """
[models.alpha]
image = "localhost/sparkd-test-engine:latest"
args = ["--port", "8000"]
"""


def test_loading_feedback_is_a_model_setting_and_a_bad_value_is_named(tmp_path: Path):
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(MODEL + 'loading_feedback = "reasoning"\n'))
    assert load_config(path).models["alpha"].loading_feedback == "reasoning"
    path.write_text(textwrap.dedent(MODEL))
    assert load_config(path).models["alpha"].loading_feedback == "off"
    path.write_text(textwrap.dedent(MODEL + 'loading_feedback = "thinking"\n'))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    text = "\n".join(str(p) for p in refused.value.problems)
    assert "models.alpha.loading_feedback: expected one of 'off', 'content', 'reasoning', found string 'thinking'" in text


def test_check_config_names_a_bad_loading_feedback(tmp_path: Path):
    path = tmp_path / "sparkd.toml"
    path.write_text(textwrap.dedent(MODEL + 'loading_feedback = "thinking"\n'))
    result = subprocess.run([sys.executable, "-m", "sparkd", "check-config", "--config", str(path), "--no-images"],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 1
    assert "models.alpha.loading_feedback: expected one of 'off', 'content', 'reasoning'" in result.stdout + result.stderr


KEY = "sk-alice-" + "a" * 32


def test_a_keys_loading_feedback_wins_over_the_models_and_a_bad_one_is_named(tmp_path: Path):
    path = tmp_path / "keys.toml"
    write_keys(path, {"alice": {"key": KEY, "loading_feedback": "content"}, "bob": {"key": "sk-bob-" + "b" * 32}})
    keys = KeyRing.load(path, required=True)
    quiet, chatty = ModelConfig(name="q", image="i"), ModelConfig(name="c", image="i", loading_feedback="reasoning")
    alice, bob = keys.check(KEY), keys.check("sk-bob-" + "b" * 32)
    assert alice is not None and bob is not None
    assert (alice.feedback_for(quiet), alice.feedback_for(chatty)) == ("content", "content")
    assert (bob.feedback_for(quiet), bob.feedback_for(chatty)) == ("off", "reasoning")
    write_keys(path, {"alice": {"key": KEY, "loading_feedback": "loud"}})
    with pytest.raises(KeysFileError) as refused:
        KeyRing.load(path, required=True)
    assert "keys.alice.loading_feedback: expected one of \"off\", \"content\", \"reasoning\", found string 'loud'" in str(refused.value)
    assert KEY not in str(refused.value)


def test_the_engines_anthropic_stream_follows_sparkds_opening_without_its_message_start_its_blocks_moved_up_its_usage_kept():
    engine = (
        b'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}\n\n'
        b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "index 7"}}\n\n'
        b'event: content_block_stop\ndata: {"type": "content_block_stop", "index":1}\n\n'
        b'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}\n\n'
        b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
    )
    for size in (1, 7, 64, len(engine)):
        rewrite = AnthropicAfterLoading()
        out = b"".join(rewrite.feed(engine[i:i + size]) for i in range(0, len(engine), size)) + rewrite.flush()
        events = [e for e in out.split(b"\n\n") if e]
        assert [e.split(b"\n")[0] for e in events] == [
            b"event: content_block_start", b"event: ping", b"event: content_block_delta", b"event: content_block_stop",
            b"event: message_delta", b"event: message_stop",
        ]
        assert b'"index": 1, "content_block"' in events[0] and b'"index": 1, "delta"' in events[2]
        assert b'"text": "index 7"' in events[2], "only the block's own index moves"
        assert b'"index": 2}' in events[3]
        delta = json.loads(events[4].split(b"data: ", 1)[1])
        assert delta == {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": 5, "output_tokens": 2}}
        assert events[5] == [e for e in engine.split(b"\n\n") if e][-1]


def test_sparkds_anthropic_opening_is_a_message_with_its_loading_block_at_index_0():
    opening = anthropic_opening("reasoning", "m", "msg_sparkd_1")
    start, block = (json.loads(e.split(b"data: ", 1)[1]) for e in opening.split(b"\n\n") if e)
    assert start["type"] == "message_start" and start["message"]["model"] == "m" and start["message"]["content"] == []
    assert block == {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
    delta = feedback_event("/v1/messages", "reasoning", "m", "t\n", "i")
    assert delta == b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "t\\n"}}\n\n'
    text = json.loads(feedback_event("/v1/messages", "content", "m", "t\n", "i").split(b"data: ", 1)[1])
    assert text["delta"] == {"type": "text_delta", "text": "t\n"}
    assert feedback_event("/v1/messages", "off", "m", "t", "i") is None
