#!/usr/bin/env bash
# Build the sparkd Debian package for this machine's architecture.
#
#   packaging/build-deb.sh [--out DIR] [--cache DIR] [--no-cache] [--verbose] [--print-hash]
#
# The source root stays clean: the sources, packaging/debian (as debian/) and
# the unit are copied into a temporary tree and `dpkg-buildpackage -us -uc -b`
# runs there. The .deb is cached under a content hash of everything that goes
# into it (sources, packaging, architecture, Python version), so an unchanged
# tree is not rebuilt. The last line on stdout is the path of the .deb.
#
# Needs: dpkg-dev debhelper dh-virtualenv python3-venv python3-dev (and PyPI
# access for pip; behind a TLS-inspecting proxy export PIP_CERT and
# REQUESTS_CA_BUNDLE first - a build-time setting only, nothing is packaged).
# The .deb matches the build machine: build on arm64 (a DGX Spark) for arm64,
# on amd64 for amd64, on the same distribution release as the target.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=$REPO/dist
CACHE=${SPARKD_DEB_CACHE:-/var/cache/sparkd-build}
USE_CACHE=1
VERBOSE=0
PRINT_HASH=0

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --no-cache) USE_CACHE=0; shift ;;
        --verbose|-v) VERBOSE=1; shift ;;
        --print-hash) PRINT_HASH=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "build-deb: $*" >&2; }
die() { echo "build-deb: error: $*" >&2; exit 1; }

# --- what goes into the package ------------------------------------------------
# Paths relative to the repository; each is copied into the build tree.
INPUTS=(pyproject.toml sparkd systemd packaging/debian packaging/README.md packaging/build-deb.sh packaging/requirements.lock packaging/sparkd-background)
[ -f "$REPO/README.md" ] && INPUTS+=(README.md)
[ -f "$REPO/LICENSE" ] && INPUTS+=(LICENSE)
# Image recipes for `sparkd images build` (installed to /usr/share/sparkd/containerfiles).
[ -d "$REPO/containerfiles" ] && INPUTS+=(containerfiles)
# The shipped model catalog: /etc/sparkd/models.d/*.toml (conffiles).
[ -d "$REPO/etc/models.d" ] && INPUTS+=(etc/models.d)
if [ -f "$REPO/etc/sparkd.toml" ]; then
    INPUTS+=(etc/sparkd.toml)
    CONFIG_SOURCE=etc/sparkd.toml
else
    INPUTS+=(packaging/sparkd.minimal.toml)
    CONFIG_SOURCE=packaging/sparkd.minimal.toml
fi

ARCH=$(dpkg --print-architecture)
PYVER=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VERSION=$(/usr/bin/python3 - "$REPO/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
print(match.group(1) if match else "0.0.0")
PY
)
DEB_VERSION=${SPARKD_DEB_VERSION:-$VERSION-1}

content_hash() {
    # Every regular file of the inputs (no bytecode, no egg-info), by path and
    # content, plus the things that change the binary: architecture, Python.
    (
        cd "$REPO"
        printf 'arch=%s python=%s version=%s config=%s\n' "$ARCH" "$PYVER" "$DEB_VERSION" "$CONFIG_SOURCE"
        find "${INPUTS[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -c1-16
}
HASH=$(content_hash)
if [ "$PRINT_HASH" = 1 ]; then echo "$HASH"; exit 0; fi

DEB_NAME="sparkd_${DEB_VERSION}_${ARCH}.deb"
CACHED=$CACHE/$HASH/$DEB_NAME
mkdir -p "$OUT"
if [ "$USE_CACHE" = 1 ] && [ -f "$CACHED" ]; then
    say "cached build $HASH: $CACHED"
    cp "$CACHED" "$OUT/$DEB_NAME"
    echo "$OUT/$DEB_NAME"
    exit 0
fi

for tool in dpkg-buildpackage dh dh_virtualenv; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install dpkg-dev debhelper dh-virtualenv python3-venv python3-dev"
done

# --- the build tree --------------------------------------------------------------
WORK=$(mktemp -d /tmp/sparkd-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/sparkd-$VERSION
mkdir -p "$TREE"
(cd "$REPO" && tar --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' -cf - "${INPUTS[@]}") | tar -C "$TREE" -xf -
# dh_install wants a match for every line of sparkd.install: drop the lines of
# optional parts this tree lacks.
for optional in containerfiles etc/models.d; do
    if [ -z "$(ls -A "$TREE/$optional" 2>/dev/null)" ]; then
        sed -i "\#^$optional/#d" "$TREE/packaging/debian/sparkd.install"
    fi
done
mv "$TREE/packaging/debian" "$TREE/debian"
cp "$TREE/systemd/sparkd.service" "$TREE/debian/sparkd.service"
if [ "$CONFIG_SOURCE" != etc/sparkd.toml ]; then
    say "warning: etc/sparkd.toml is missing; shipping $CONFIG_SOURCE as /etc/sparkd/sparkd.toml"
    mkdir -p "$TREE/etc" && cp "$TREE/$CONFIG_SOURCE" "$TREE/etc/sparkd.toml"
fi
# pyproject names README.md as the long description; packaging/README.md is the
# package's README.Debian (/usr/share/doc/sparkd/).
[ -f "$TREE/README.md" ] || cp "$TREE/packaging/README.md" "$TREE/README.md"
cp "$TREE/packaging/README.md" "$TREE/debian/README.Debian"

cat > "$TREE/debian/changelog" <<EOF
sparkd ($DEB_VERSION) unstable; urgency=medium

  * Built from the sparkd sources (content hash $HASH).

 -- sparkd maintainers <sparkd@localhost>  $(date -R)
EOF

say "building $DEB_NAME (content hash $HASH) in $TREE"
LOG=$WORK/build.log
start=$(date +%s)
if [ "$VERBOSE" = 1 ]; then
    (cd "$TREE" && dpkg-buildpackage -us -uc -b) 2>&1 | tee "$LOG" >&2 || { die "dpkg-buildpackage failed"; }
elif ! (cd "$TREE" && dpkg-buildpackage -us -uc -b) >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    die "dpkg-buildpackage failed (last 40 lines above)"
fi
[ -f "$WORK/$DEB_NAME" ] || die "dpkg-buildpackage did not produce $DEB_NAME: $(ls "$WORK")"
say "built in $(( $(date +%s) - start ))s"

mkdir -p "$CACHE/$HASH"
cp "$WORK/$DEB_NAME" "$CACHE/$HASH/$DEB_NAME.partial" && mv "$CACHE/$HASH/$DEB_NAME.partial" "$CACHED"
# Keep the last few builds only.
ls -1dt "$CACHE"/*/ 2>/dev/null | tail -n +6 | xargs -r rm -rf
cp "$CACHED" "$OUT/$DEB_NAME"
echo "$OUT/$DEB_NAME"
