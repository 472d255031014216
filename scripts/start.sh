#!/usr/bin/env bash
# Install dicomnode into ./.venv, put the `dicomnode` command on the PATH (a link in ~/.local/bin) and start
# the node. Without arguments it runs the embedded default (dicomnode config --print-defaults shows it): AE
# title DICOMNODE on 127.0.0.1:11112, CT series through the classical lung pipeline, the status page on
# http://127.0.0.1:8110/, data in $DICOMNODE_HOME (default ~/.local/share/dicomnode), inference on the GPU
# when one is present, else the CPU. Pass --config FILE to use a configuration (see config/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # no GPU here: the CPU build, not several GB of CUDA libraries (named in both commands, so that no
  # dependency moves it)
  $PY -m pip install -q "torch==2.13.0"
  $PY -m pip install -q "torch==2.13.0" -e .
else
  $PY -m pip install -q -e .
fi
bash scripts/link_cli.sh .venv/bin/dicomnode
echo "data: ${DICOMNODE_HOME:-$HOME/.local/share/dicomnode}   status page: http://127.0.0.1:8110/   stop: Ctrl+C"
exec .venv/bin/dicomnode serve "$@"
