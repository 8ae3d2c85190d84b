#!/bin/bash
# Install the real clients (OpenCode, the Cline CLI) that test_real_clients.py drives, at the
# versions package-lock.json pins, into a cache directory keyed by that lock file: a warm run
# installs nothing. Prints the directory (its node_modules/.bin holds `opencode` and `cline`).
# Needs Node.js and npm (tests/setup/host.sh installs them) and the npm registry only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${SPARKD_TEST_CACHE:-/var/cache/sparkd-test}
key=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)
target="$cache_root/clients-$key"
if [ -x "$target/node_modules/.bin/opencode" ] && [ -x "$target/node_modules/.bin/cline" ]; then
    echo "$target"
    exit 0
fi
command -v npm >/dev/null || { echo "install.sh: npm is missing; run tests/setup/host.sh as root" >&2; exit 1; }
partial="$target.partial.$$"
trap 'rm -rf "$partial"' EXIT  # a failed install leaves nothing behind
rm -rf "$partial"
mkdir -p "$partial"
cp "$here/package.json" "$here/package-lock.json" "$partial/"
# `npm install` over the lock, not `npm ci`: the lock npm writes records only this machine's
# platform binaries (opencode-linux-x64, @cline/cli-linux-x64), and `npm ci` refuses a lock that
# lacks the others (an arm64 Spark needs its own). Every package the lock records keeps its version,
# and the platform binaries are pinned exactly by their parents (opencode-ai, cline).
# The npm cache of this install stays with it: no user's ~/.npm is read or written.
(cd "$partial" && npm install --no-audit --no-fund --cache "$partial/.npm-cache" >&2)
rm -rf "$partial/.npm-cache"
rm -rf "$target"
mv "$partial" "$target"
echo "$target"
