#!/usr/bin/env bash
# Set up fastlmm_ext on a fresh Debian/Ubuntu machine: system libraries (CHOLMOD from
# SuiteSparse, OpenBLAS so CHOLMOD's supernodal factorization uses an optimised BLAS),
# a virtual environment in .venv, and the package with the extras given as $1 (e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
need=""
if command -v dpkg >/dev/null 2>&1; then
  for pkg in libsuitesparse-dev libopenblas-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
fi
if [ -n "$need" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Wait (up to 10 minutes) for another apt or dpkg to release its lock instead of failing at once.
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq $need >/dev/null
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q ".[$extras]"
else
  .venv/bin/python -m pip install -q .
fi
