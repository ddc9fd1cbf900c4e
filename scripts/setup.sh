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
mapfile -t PKGS < <(grep -vE '^\s*(#|$)' deps/apt.txt)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
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

# --- 3. test guest ----------------------------------------------------------------
"$VPY" -m dataplane.testing.guest build
log "ready"
