#!/usr/bin/env bash
# Prepare a Debian 12 host (as root) for sparkd's test suite: Podman with its REST
# socket, debootstrap for the test images, and the Debian packaging tools.
# Idempotent: a warm run installs nothing and leaves a running service alone.
set -euo pipefail

# Overridable only so the script itself can be tested beside a running service.
SOCK=${SPARKD_TEST_PODMAN_SOCK:-/run/podman/podman.sock}
LOG=${SPARKD_TEST_PODMAN_LOG:-/var/log/sparkd-test-podman.log}
PACKAGES=(podman runc debootstrap busybox-static curl python3-venv python3-dev
          dh-virtualenv debhelper dpkg-dev chromium chromium-driver)

die() { echo "host.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts podman's service)"

# --- packages: skip apt entirely when everything is installed (fast warm runs)
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "host.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${PACKAGES[@]}"
else
    echo "host.sh: packages already installed"
fi
# Node.js and npm for the real clients (tests/clients/install.sh): Debian's, unless the
# machine already has some (NodeSource's nodejs carries its own npm and conflicts with Debian's).
if ! command -v npm >/dev/null; then
    echo "host.sh: installing nodejs npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q nodejs npm
fi

# --- containers.conf
# TEST-MACHINE SETTINGS, not product settings: the CI/dev VMs have a cgroups v1/v2
# hybrid layout that crun refuses ("cgroups in hybrid mode not supported"), so use
# runc; and podman's default ulimits exceed these VMs' hard limits (setrlimit EPERM).
# A DGX Spark (pure cgroups v2) needs neither.
mkdir -p /etc/containers
conf=$(cat <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
)
if [ ! -f /etc/containers/containers.conf ] || [ "$(cat /etc/containers/containers.conf)" != "$conf" ]; then
    printf '%s\n' "$conf" > /etc/containers/containers.conf
    echo "host.sh: wrote /etc/containers/containers.conf"
    conf_changed=1
else
    conf_changed=0
fi

# --- podman REST service
mkdir -p "$(dirname "$SOCK")"
ping_ok() { curl -sf --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

if ping_ok; then
    if [ "$conf_changed" = 1 ]; then
        echo "host.sh: warning: the running podman service predates the new containers.conf; restart it to apply" >&2
    fi
    echo "host.sh: podman service answers on $SOCK"
    exit 0
fi

# A stale socket file from a dead service would make the new one fail to bind.
[ -S "$SOCK" ] && rm -f "$SOCK"
echo "host.sh: starting podman system service (log: $LOG)"
# setsid: the service must outlive this script and the shell/CI step that ran it.
nohup setsid podman system service --time=0 "unix://$SOCK" >>"$LOG" 2>&1 < /dev/null &
svc_pid=$!

for _ in $(seq 1 100); do          # up to 20 s
    if ping_ok; then
        echo "host.sh: podman service ready on $SOCK (pid $svc_pid)"
        exit 0
    fi
    if ! kill -0 "$svc_pid" 2>/dev/null; then
        tail -n 20 "$LOG" >&2 || true
        die "podman system service exited; see $LOG"
    fi
    sleep 0.2
done
tail -n 20 "$LOG" >&2 || true
die "podman service did not answer on $SOCK within 20 s; see $LOG"
