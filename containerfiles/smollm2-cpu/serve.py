"""Entrypoint of the sparkd smollm2-cpu image.

llama-cpp-python's own server (`python -m llama_cpp.server`) with three changes
that make it behave like the vLLM engines sparkd starts:

* ``GET /health`` answers 200 without authentication once the model is loaded
  (the server only starts listening after the model has loaded, so any answer
  means ready). Upstream has no health route: its only unauthenticated paths
  are the FastAPI docs.
* The API key may come from ``--api_key``, ``API_KEY`` (upstream) or
  ``VLLM_API_KEY`` (what the vLLM images read), in that order.
* ``--host``/``--port`` on the command line win over the ``HOST``/``PORT``
  environment variables (upstream lets the environment override the command
  line for these two only).

Every other option is upstream's (``--n_threads``, ``--n_ctx``, ...), each also
readable from the environment variable of the same name.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from fastapi import Response
from llama_cpp.server.app import create_app
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="SmolLM2-135M-Instruct on llama-cpp-python (sparkd CPU demo engine)"
    )
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)

    if args.api_key is None and not os.environ.get("API_KEY"):
        vllm_key = os.environ.get("VLLM_API_KEY")
        if vllm_key:
            args.api_key = vllm_key
    if args.api_key == "":
        print("serve.py: --api_key must not be empty", file=sys.stderr)
        sys.exit(2)

    try:
        server_settings = parse_model_from_args(ServerSettings, args)
        model_settings = parse_model_from_args(ModelSettings, args)
    except Exception as exc:  # pydantic validation error: say what and exit
        print(f"serve.py: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)

    print(
        f"serve.py: model={model_settings.model} alias={model_settings.model_alias} "
        f"host={server_settings.host} port={server_settings.port} "
        f"auth={'on' if server_settings.api_key else 'off'}",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(server_settings=server_settings, model_settings=[model_settings])

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        return Response(status_code=200)

    uvicorn.run(
        app,
        host=server_settings.host,
        port=server_settings.port,
        ssl_keyfile=server_settings.ssl_keyfile,
        ssl_certfile=server_settings.ssl_certfile,
    )


if __name__ == "__main__":
    main()
