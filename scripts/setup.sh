#!/usr/bin/env bash
# One idempotent set-up step for a fresh Debian bookworm machine.
# Installs the system packages listed in deps/apt.txt, creates .venv with the
# package (and its native extensions) installed, and builds the test guest.
# Both `make demo` and `make test` call this; running it twice is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. system packages ------------------------------------------------------
# deps/apt.txt from the release's own suite; QEMU and libvirt (deps/apt-backports.txt) from
# bookworm-backports on bookworm, the primary test platform (QEMU 10, libvirt 11).
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
. /etc/os-release
BACKPORTS=""
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    BACKPORTS=bookworm-backports
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "enabling Debian's bookworm-backports suite (QEMU 10, libvirt 11)"
        printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            | $SUDO tee /etc/apt/sources.list.d/dataplane-backports.sources >/dev/null
        $SUDO apt-get update -q
    fi
fi
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
mapfile -t PKGS < <(grep -vE '^\s*(#|$)' deps/apt.txt)
missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
mapfile -t BPO < <(grep -vE '^\s*(#|$)' deps/apt-backports.txt)
missing=()
for p in "${BPO[@]}"; do
    # on bookworm, the package must be the backports build (a version with ~bpo), not bookworm's own
    if ! installed "$p" || { [ -n "$BACKPORTS" ] && ! dpkg-query -W -f='${Version}' "$p" | grep -q '~bpo'; }; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}${BACKPORTS:+ from $BACKPORTS}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        ${BACKPORTS:+-t "$BACKPORTS"} "${missing[@]}"
fi

# --- 2. virtualenv with the package --------------------------------------------
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
stamp=.venv/.dataplane-installed
want=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing Python dependencies"
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install -q "setuptools>=77" wheel "Cython>=3.0"
    "$VPY" -m pip install -q --no-build-isolation -e ".[test]"
    echo "$want" > "$stamp"
fi
# Rebuild the native extensions whenever an ext/ source changed (cheap when not).
"$VPY" setup.py -q build_ext --inplace >/dev/null
# Byte-compile the sources like a regular (non-editable) install does: with PYTHONDONTWRITEBYTECODE
# set, every `dataplane migrate` would otherwise recompile ~50 modules at start (~0.17 s).
"$VPY" -m compileall -q dataplane qmp_driver >/dev/null

# --- 3. test guest and the QEMU 7.2 floor -------------------------------------------
"$VPY" -m dataplane.testing.guest build
if [ -n "$BACKPORTS" ]; then
    bash scripts/qemu-floor.sh >/dev/null
fi
log "ready: $(qemu-system-x86_64 --version | head -1), libvirt $(libvirtd --version | awk '{print $NF}')"
