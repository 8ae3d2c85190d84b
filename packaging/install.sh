#!/usr/bin/env bash
# Install and start sparkd on a Debian/Ubuntu host (run as root from a checkout):
#
#   sudo ./packaging/install.sh [--deb FILE] [--no-demo-image]
#
# 1. installs Podman (and, unless --deb is given, the packaging tools) if missing;
# 2. builds the sparkd .deb from this checkout (packaging/build-deb.sh), or takes FILE;
# 3. enables podman.socket and installs the .deb with apt, which creates the
#    sparkd user and /etc/sparkd/keys.toml and starts sparkd.service;
# 4. on a host without an NVIDIA CDI spec, builds the CPU demo model's image
#    (localhost/sparkd/smollm2-cpu) so the shipped catalog has a model to serve.
#
# Idempotent: run it again after `git pull` to upgrade (the configuration and
# keys are kept). Behind a TLS-inspecting proxy export PIP_CERT (and
# REQUESTS_CA_BUNDLE) for the build first.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEB=""
DEMO_IMAGE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) DEB=$(realpath "$2"); shift 2 ;;
        --no-demo-image) DEMO_IMAGE=0; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
command -v apt-get >/dev/null || die "this installer needs a Debian or Ubuntu host (apt-get)"
[ -d /run/systemd/system ] || die "systemd is not running as PID 1 here; sparkd runs as a systemd service"

missing() {
    local pkg out=()
    for pkg in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || out+=("$pkg")
    done
    echo "${out[@]:-}"
}

export DEBIAN_FRONTEND=noninteractive
WANT=(podman)
[ -n "$DEB" ] || WANT+=(dpkg-dev debhelper dh-virtualenv python3-venv python3-dev)
NEED=$(missing "${WANT[@]}")
if [ -n "$NEED" ]; then
    say "installing $NEED"
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q $NEED || die "could not install $NEED (on Ubuntu, dh-virtualenv is in 'universe': add-apt-repository universe)"
fi

if [ -z "$DEB" ]; then
    say "building the sparkd package ($(dpkg --print-architecture))"
    DEB=$("$REPO/packaging/build-deb.sh" --out "$REPO/dist" | tail -n 1)
fi
[ -f "$DEB" ] || die "no package at $DEB"

say "enabling podman.socket"
systemctl enable --now podman.socket

say "installing $(basename "$DEB")"
apt-get install -y -q "$DEB"

# Wait for the service: `systemctl start` (run by the package) returns once it is ready,
# but a restart after an upgrade may still be settling.
for _ in $(seq 1 60); do
    state=$(systemctl is-active sparkd 2>/dev/null || true)
    [ "$state" = active ] && break
    [ "$state" = failed ] && break
    sleep 1
done
if [ "$(systemctl is-active sparkd 2>/dev/null || true)" != active ]; then
    journalctl -u sparkd -n 30 --no-pager >&2 || true
    die "sparkd.service is not running (journal above); fix /etc/sparkd/sparkd.toml, then: systemctl restart sparkd"
fi

if [ "$DEMO_IMAGE" = 1 ] && ! ls /etc/cdi/*.yaml /etc/cdi/*.json /var/run/cdi/*.yaml /var/run/cdi/*.json >/dev/null 2>&1; then
    if podman image exists localhost/sparkd/smollm2-cpu:latest; then
        say "no NVIDIA CDI spec: the CPU demo model's image is already there"
    else
        say "no NVIDIA CDI spec: building the CPU demo model's image (a few minutes: it compiles llama.cpp)"
        sparkd images build smollm2-cpu \
            || echo "install.sh: warning: the CPU demo image did not build; sparkd runs, but smollm2-135m-cpu cannot start until it exists (sparkd images build smollm2-cpu)" >&2
    fi
fi

port=$(sparkd check-config 2>/dev/null | sed -n 's/.*listening on \([^,]*\).*/\1/p' | head -n1)
say "sparkd is running: $(systemctl show -p StatusText --value sparkd)"
cat <<EOF
  endpoint      http://${port:-127.0.0.1:8009}/v1   (OpenAI-compatible)
  client keys   sudo cat /etc/sparkd/keys.toml
  status        systemctl status sparkd;  journalctl -u sparkd -f
  check         sudo sparkd doctor
  configuration /etc/sparkd/sparkd.toml and /etc/sparkd/models.d/*.toml, then: systemctl reload sparkd
EOF
