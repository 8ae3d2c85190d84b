#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml with uv (a maintained resolver, from PyPI):
#
#   packaging/lock.sh              # after a change to pyproject.toml: keep every pin that still fits
#   packaging/lock.sh --upgrade    # move every package to its newest release within pyproject's ranges
#   packaging/lock.sh --upgrade-package aiohttp   # just one
#
# packaging/requirements.lock  sparkd's dependencies, the exact versions the .deb's
#                              virtualenv is built from (debian/rules), each with the
#                              sha256 of every file PyPI has for it (any architecture),
#                              so pip refuses anything else;
# tests/requirements.lock      the same pins plus the test dependencies: tests/run-all.sh
#                              builds its venv from it, so the tests run what ships.
#
# The lock is universal (markers for Python 3.10 and later), so the Debian 12
# (3.11) and DGX OS / Ubuntu 24.04 (3.12) builds install the same versions.
# Commit both files. Behind a TLS-inspecting proxy, SSL_CERT_FILE must name its CA
# (uv uses the system trust store here: --native-tls).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
UV_VERSION=0.13.9
TOOLS=${SPARKD_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/sparkd-lock/uv-$UV_VERSION}

if [ ! -x "$TOOLS/bin/uv" ]; then
    echo "lock: installing uv $UV_VERSION into $TOOLS" >&2
    rm -rf "$TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

compile() {
    # uv's default index only: a machine's own pip settings (extra indexes, find-links) never leak into the lock.
    (cd "$REPO" && UV_NO_CONFIG=1 "$TOOLS/bin/uv" pip compile pyproject.toml --quiet --universal --python-version 3.10 \
        --generate-hashes --native-tls \
        --custom-compile-command "packaging/lock.sh" "$@")
}

compile -o packaging/requirements.lock "$@"
compile --extra test --constraint packaging/requirements.lock -o tests/requirements.lock "$@"
echo "lock: wrote packaging/requirements.lock and tests/requirements.lock; commit both" >&2
