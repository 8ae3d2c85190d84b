#!/usr/bin/env bash
# Install and start sparkd on a Debian/Ubuntu host (run as root from a checkout):
#
#   sudo ./packaging/install.sh [--deb FILE] [--no-demo-image]
#
# 1. installs Podman and curl (and, unless --deb is given, the packaging tools) if missing;
# 2. builds the sparkd .deb from this checkout (packaging/build-deb.sh), or takes FILE;
# 3. installs the .deb with apt, which creates the sparkd user and
#    /etc/sparkd/keys.toml, and starts sparkd:
#    - with systemd as PID 1: enables podman.socket; the package starts sparkd.service;
#    - without (containers, CI machines, WSL, many VMs): `sparkd-background start`
#      starts Podman's API service if none answers and runs sparkd in the background
#      as the sparkd user, its log in /var/log/sparkd/. Where this host's Podman
#      cannot run containers with its defaults (crun on a cgroups v1/v2 hybrid, default
#      ulimits above the host's hard limits) it writes
#      /etc/containers/containers.conf.d/50-sparkd.conf, and says so;
# 4. on a host without an NVIDIA CDI spec, builds the CPU demo model's image
#    (localhost/sparkd/smollm2-cpu) so the shipped catalog has a model to serve.
#
# Idempotent: run it again after `git pull` to upgrade (the configuration and
# keys are kept). Behind a TLS-inspecting proxy set PIP_CERT (and REQUESTS_CA_BUNDLE)
# for both builds, which hand it to pip: `sudo PIP_CERT=FILE ./packaging/install.sh`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEB=""
DEMO_IMAGE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --deb) DEB=$(realpath "$2"); shift 2 ;;
        --no-demo-image) DEMO_IMAGE=0; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
command -v apt-get >/dev/null || die "this installer needs a Debian or Ubuntu host (apt-get)"
if [ -d /run/systemd/system ]; then
    MODE=systemd
    say "mode: systemd is PID 1 here: sparkd runs as the systemd service sparkd.service"
else
    MODE=background
    say "mode: no systemd as PID 1 here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): sparkd runs in the background as the sparkd user (sparkd-background), not as a service: nothing restarts it after a crash or a reboot"
fi

missing() {
    local pkg out=()
    for pkg in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || out+=("$pkg")
    done
    echo "${out[@]:-}"
}

# Hosts whose Podman cannot run a container with its defaults (VMs and CI machines
# like the ones this is tested on): crun refuses a cgroups v1/v2 hybrid layout, and
# Podman's rootful default ulimits (nofile 1048576, nproc 4194304) can exceed the
# host's hard limits (setrlimit EPERM). A systemd host is left as it is; so is a host
# whose containers.conf already chooses these settings.
CONF_DROPIN=/etc/containers/containers.conf.d/50-sparkd.conf
PODMAN_NOFILE=1048576
PODMAN_NPROC=4194304
conf_sets() {  # some containers.conf (comments aside) sets key $1
    local file
    for file in /usr/share/containers/containers.conf /etc/containers/containers.conf /etc/containers/containers.conf.d/*.conf; do
        [ -f "$file" ] && grep -q "^[[:space:]]*$1[[:space:]]*=" "$file" && return 0
    done
    return 1
}
hybrid_cgroups() {
    [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] && [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]
}
hard_limit_below() {  # ulimit flag, Podman's default
    local hard
    hard=$(ulimit -H "$1")
    [ "$hard" != unlimited ] && [ "$hard" -lt "$2" ]
}
container_settings() {
    local containers=() engine=() ulimits=()
    if ! conf_sets default_ulimits; then
        if hard_limit_below -n "$PODMAN_NOFILE"; then ulimits+=("\"nofile=$(ulimit -Hn):$(ulimit -Hn)\""); fi
        if hard_limit_below -u "$PODMAN_NPROC"; then ulimits+=("\"nproc=$(ulimit -Hu):$(ulimit -Hu)\""); fi
    fi
    if [ ${#ulimits[@]} -gt 0 ]; then
        containers=("[containers]" "default_ulimits = [$(IFS=,; echo "${ulimits[*]}")]")
    fi
    if hybrid_cgroups && ! conf_sets runtime; then
        engine=("[engine]" 'runtime = "runc"')
    fi
    if [ ${#containers[@]} -gt 0 ] || [ ${#engine[@]} -gt 0 ]; then
        printf '%s\n' "${containers[@]}" "${engine[@]}" | sed '/^$/d'
    fi
}

export DEBIAN_FRONTEND=noninteractive
WANT=(podman curl)
[ -n "$DEB" ] || WANT+=(dpkg-dev debhelper dh-virtualenv python3-venv python3-dev)
if [ "$DEMO_IMAGE" = 1 ]; then
    WANT+=(debootstrap)   # sparkd images build makes its base with it where no registry answers
fi
SETTINGS=""
if [ "$MODE" = background ]; then
    SETTINGS=$(container_settings)
    case "$SETTINGS" in *runc*) WANT+=(runc) ;; esac
fi
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

if [ "$MODE" = systemd ]; then
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
else
    if [ -n "$SETTINGS" ]; then
        say "CHANGING THIS HOST'S PODMAN SETTINGS: writing $CONF_DROPIN"
        echo "  Podman's defaults cannot run containers on this host (crun on a cgroups v1/v2 hybrid"
        echo "  layout, or default ulimits above its hard limits). For every Podman user from now on:"
        printf '%s\n' "$SETTINGS" | sed 's/^/    /'
        echo "  Delete $CONF_DROPIN to undo it."
        mkdir -p "${CONF_DROPIN%/*}"
        printf '# Written by sparkd'"'"'s install.sh: this host cannot run containers with Podman'"'"'s defaults.\n%s\n' "$SETTINGS" > "$CONF_DROPIN"
        if [ -S /run/podman/podman.sock ]; then
            echo "install.sh: warning: a Podman API service may already be running; it reads $CONF_DROPIN only when restarted" >&2
        fi
    fi
    # An upgrade replaces the program under a running sparkd: stop it first, start the new one after.
    if command -v sparkd-background >/dev/null; then
        sparkd-background stop
    fi

    say "installing $(basename "$DEB")"
    apt-get install -y -q "$DEB"

    say "starting sparkd in the background"
    sparkd-background start || die "sparkd did not start (see above); fix /etc/sparkd/sparkd.toml, then: sudo sparkd-background start"
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

port=$(sparkd check-config --no-images 2>/dev/null | sed -n 's/.*listening on \([^,]*\).*/\1/p' | head -n1)
if [ "$MODE" = systemd ]; then
    say "sparkd is running (mode: systemd service): $(systemctl show -p StatusText --value sparkd)"
    cat <<EOF
  endpoint      http://${port:-127.0.0.1:8009}/v1   (OpenAI-compatible)
  client keys   sudo cat /etc/sparkd/keys.toml
  status        systemctl status sparkd;  journalctl -u sparkd -f
  stop          sudo systemctl stop sparkd
  after reboot  nothing to do: sparkd.service is enabled and starts at boot
  check         sudo sparkd doctor
  configuration /etc/sparkd/sparkd.toml and /etc/sparkd/models.d/*.toml, then: systemctl reload sparkd
EOF
else
    say "sparkd is running (mode: background, no systemd): $(sparkd-background status | head -n 1 | sed 's/^sparkd-background: //')"
    cat <<EOF
  endpoint      http://${port:-127.0.0.1:8009}/v1   (OpenAI-compatible)
  client keys   sudo cat /etc/sparkd/keys.toml
  log           sudo tail -f /var/log/sparkd/sparkd.log   (Podman's API service, when sparkd-background started it: /var/log/sparkd/podman.log)
  status        sudo sparkd-background status
  stop          sudo sparkd-background stop
  after reboot  sudo sparkd-background start   (no systemd here: nothing starts it at boot)
  check         sudo sparkd doctor
  configuration /etc/sparkd/sparkd.toml and /etc/sparkd/models.d/*.toml, then: sudo sparkd-background reload
EOF
fi
