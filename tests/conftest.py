"""Shared test fixtures: the real series in ../shared/data, free loopback ports, real DICOM peers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.ops.runtime import configure_libraries

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DICOMNODE_SHARED_DATA", REPO.parent / "shared" / "data"))


def series_dir(prefix: str) -> Path:
    """The folder of shared series ``prefix`` (e.g. "P01"); the test fails loudly if it is absent."""
    matches = sorted(DATA.glob(f"{prefix}_*"))
    if len(matches) != 1:
        raise FileNotFoundError(f"shared series {prefix} not found under {DATA}")
    return matches[0]


# In-process tests run under the library settings every node process makes at start-up (strict writing,
# lenient quiet reading, streamed C-STORE): see dicomnode.ops.runtime.
configure_libraries()


@pytest.fixture(autouse=True)
def _node_library_settings() -> object:
    """Every test starts from the node's settings, whatever an earlier test changed."""
    configure_libraries()
    yield None
