"""Shared test fixtures: the real series in ../shared/data, free loopback ports, real DICOM peers."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


def series_dir(prefix: str) -> Path:
    """The folder of shared series ``prefix`` (e.g. "P01"); the test fails loudly if it is absent."""
    matches = sorted(DATA.glob(f"{prefix}_*"))
    if len(matches) != 1:
        raise FileNotFoundError(f"shared series {prefix} not found under {DATA}")
    return matches[0]


@pytest.fixture(autouse=True)
def _strict_pydicom() -> object:
    """Encode tests round-trip with strict value checking, as the house style asks."""
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield None
    pydicom.config.settings.writing_validation_mode = old
