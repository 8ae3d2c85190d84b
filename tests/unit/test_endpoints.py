"""A model's API paths (``api_paths``): what is served, and the error for what is not (sparkd/http/endpoints.py)."""

from __future__ import annotations

from sparkd.config import ModelConfig
from sparkd.config.schema import VLLM_API_PATHS
from sparkd.http.endpoints import is_missing_route, serves, unsupported

DEMO = ModelConfig(name="smol", image="i", api_paths=("/v1/chat/completions", "/v1/completions", "/v1/models"))


def test_vllm_paths_are_the_default_and_sub_paths_are_served():
    vllm = ModelConfig(name="v", image="i")
    assert vllm.api_paths == VLLM_API_PATHS
    assert serves(vllm, "/v1/responses") and serves(vllm, "/v1/responses/resp_1") and serves(vllm, "/v1/messages")
    assert not serves(vllm, "/v1/chat") and not serves(vllm, "/v1/responsesx")


def test_the_demo_model_serves_only_what_llama_cpp_python_has():
    assert serves(DEMO, "/v1/chat/completions")
    assert not serves(DEMO, "/v1/messages") and not serves(DEMO, "/v1/responses") and not serves(DEMO, "/v1/embeddings")


def test_the_error_names_the_path_the_model_and_what_it_serves():
    error = unsupported(DEMO, "/v1/messages")
    assert error.status == 404 and error.code == "unsupported_endpoint" and error.retry_after is None
    assert "model smol" in error.message and "POST /v1/messages" in error.message
    assert "/v1/chat/completions, /v1/completions, /v1/models" in error.message
    assert error.body()["error"]["endpoints"] == list(DEMO.api_paths)


def test_only_a_missing_route_is_translated():
    assert is_missing_route(404, b'{"detail":"Not Found"}')
    assert is_missing_route(405, b'{"detail":"Method Not Allowed"}')
    assert is_missing_route(404, b"Not Found")
    assert not is_missing_route(404, b'{"error": {"message": "The model `x` does not exist.", "code": 404}}')
    assert not is_missing_route(400, b'{"detail":"Not Found"}')
