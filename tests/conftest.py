"""Shared test fixtures: the real series in ../shared/data, free loopback ports, real DICOM peers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def p03() -> Any:
    """The small CT series P03 as a Volume, loaded once per test module."""
    from dicomnode.imaging.volume import load_series_dir

    return load_series_dir(series_dir("P03"))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Any]:
    """Makes in-process Storage SCPs (``scp(**node_settings)``) on free ports; all shut down after the test."""
    from tests.scp_peer import Scp

    started: list[Scp] = []

    def make(**node: Any) -> Scp:
        s = Scp(tmp_path, **node)
        started.append(s)
        return s

    yield make
    for s in started:
        s.server.shutdown(grace=0.5)
