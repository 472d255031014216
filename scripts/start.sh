#!/usr/bin/env bash
# Install dicomnode into ./.venv and start it. Without arguments it runs on the embedded defaults:
# AE title DICOMNODE on 127.0.0.1:11112, spool and SQLite state store under ./dicomnode-data, inference on
# the GPU when one is present, else the CPU. Pass --config FILE to use a configuration (see config/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"   # no GPU here: the CPU build, not several GB of CUDA libraries
fi
$PY -m pip install -q -e .
exec .venv/bin/dicomnode serve "$@"
