#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the checks and the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers and validators the tests talk to (Debian packages): Orthanc as the PACS, DCMTK as the
# modality, dicom3tools' dciodvfy and dcm2niix as validators, openssl for the TLS certificates.
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dcm2niix >/dev/null || missing+=(dcm2niix)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python: a project virtualenv; the CPU build of torch first (an unpinned torch pulls several GB of CUDA).
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
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"

$PY -m ruff check dicomnode tests scripts
$PY -m mypy
$PY -m pytest "$@"
