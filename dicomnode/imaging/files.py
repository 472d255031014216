"""Finding DICOM files on disk: by their Part 10 preamble ("DICM" at byte 128), never by file extension."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (128-byte preamble followed by ``DICM``)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def find_dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Every DICOM file among ``paths``, descending into folders; sorted, without duplicates."""
    found: set[Path] = set()
    for path in paths:
        candidates = (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found.update(p for p in candidates if is_dicom_file(p))
    return sorted(found)
