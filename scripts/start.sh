#!/usr/bin/env bash
# Install dicomnode into ./.venv and start it. Without arguments it runs on the embedded defaults:
# AE title DICOMNODE on 127.0.0.1:11112, spool and SQLite state store under ./dicomnode-data, inference on
# the GPU when one is present, else the CPU. Pass --config FILE to use a configuration (see config/).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  # Debian's system Python needs python3-venv for this; install it when it is missing.
  python3 -m venv .venv 2>/dev/null || {
    rm -rf .venv
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    python3 -m venv .venv
  }
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"   # no GPU here: the CPU build, not several GB of CUDA libraries
fi
$PY -m pip install -q -e .
exec .venv/bin/dicomnode serve "$@"
