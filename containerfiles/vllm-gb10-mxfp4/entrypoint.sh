#!/bin/sh
# sparkd vllm-gb10-mxfp4 entrypoint: print what this image was built from and
# which GPU it sees (one block in the container log, useful when a model fails
# to start), then run vLLM.
#
# Convention shared with the vllm-gb10 image: the container command starts with
# the vLLM subcommand ("serve ..."). The seed's form ("vllm serve ...") is
# accepted too: a leading "vllm" is dropped. Any other absolute command path
# (e.g. /bin/bash) is executed as given, for debugging.
set -e

if [ -r /opt/sparkd-build/build-info ]; then
    sed 's/^/[vllm-gb10-mxfp4] /' /opt/sparkd-build/build-info >&2
fi
python3 - <<'PY' >&2 || true
import torch
if torch.cuda.is_available():
    cc = torch.cuda.get_device_capability(0)
    print(f"[vllm-gb10-mxfp4] GPU: {torch.cuda.get_device_name(0)} (sm_{cc[0]}{cc[1]})")
else:
    print("[vllm-gb10-mxfp4] GPU: none visible (check the CDI device / --gpus)")
PY

case "${1:-}" in
    vllm) shift; exec vllm "$@" ;;
    /*)   exec "$@" ;;
    *)    exec vllm "$@" ;;
esac
