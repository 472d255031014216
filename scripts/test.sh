#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the checks and the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

# Real peers and validators the tests talk to (Debian packages): Orthanc as the PACS (with its DICOMweb
# plugin for STOW-RS), DCMTK as the modality, dicom3tools' dciodvfy, dcm2niix and plastimatch (reads RT
# Structure Sets back) as validators, openssl for the TLS certificates, socat for HTTPS in front of Orthanc,
# Chromium (headless) to look at the status page.
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dcm2niix >/dev/null || missing+=(dcm2niix)
command -v openssl >/dev/null || missing+=(openssl)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v plastimatch >/dev/null || missing+=(plastimatch)
command -v socat >/dev/null || missing+=(socat)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# Python (the virtualenv comes from scripts/venv.sh): the CPU build of torch first (an unpinned torch pulls
# several GB of CUDA libraries).
$PY -m pip install -q "torch==2.13.0"
# torch is named again in the same command: nnunetv2, totalsegmentator and monai pull torchvision, whose newest
# release would otherwise move torch to a newer (CUDA) build.
$PY -m pip install -q "torch==2.13.0" -e ".[test]"
$PY -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") else f"torch {v} installed: expected 2.13.0")'

$PY -m ruff check dicomnode tests scripts
$PY -m mypy
$PY -m pytest "$@"
