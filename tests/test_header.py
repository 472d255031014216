"""The SCP's fast header walk (dicomnode.receive.header) agrees with pydicom on every file in ../shared/data,
and refuses (so the SCP falls back to pydicom) rather than guesses where it cannot walk."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.multival import MultiValue

from dicomnode.receive.header import PIXEL_DATA, WANTED, HeaderError, read_header
from tests.conftest import DATA


def _split(path: Path) -> tuple[bytes, str]:
    """The encoded data set after the file meta group, and its transfer syntax."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return raw[144 + group_length:], ts


def _expected(ds: pydicom.Dataset, keyword: str) -> str | int:
    value = ds[keyword].value
    if isinstance(value, int):
        return value
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _files() -> list[Path]:
    return sorted(p for p in DATA.glob("P*/*") if p.is_file())


@pytest.mark.parametrize("head", [None, 64 * 1024], ids=["whole", "first-64KiB"])
def test_walk_agrees_with_pydicom_on_all_shared_data(head: int | None) -> None:
    files = _files()
    assert len(files) > 700
    walked = 0
    for path in files:
        data, ts = _split(path)
        try:
            header = read_header(data[:head] if head else data, len(data), ts)
        except HeaderError:
            # only big endian (left to pydicom), or a header reaching past a 64 KiB head
            assert ts == "1.2.840.10008.1.2.2" or head is not None, path
            continue
        walked += 1
        ds = pydicom.dcmread(path, defer_size=1024)
        expected = {kw: _expected(ds, kw) for kw in WANTED.values() if kw in ds}
        assert header.values == expected, path
        if "PixelData" in ds:
            raw: Any = ds.get_item("PixelData", keep_deferred=True)
            assert header.pixel_tag == PIXEL_DATA
            assert header.pixel_length == (None if raw.length == 0xFFFFFFFF else raw.length), path
    assert walked >= len(files) - (1 if head is None else 120)


def test_truncated_pixels_are_measured_and_broken_headers_refused() -> None:
    path = next(p for p in _files() if p.parent.name.startswith("P03"))
    data, ts = _split(path)
    full = read_header(data, len(data), ts)
    assert full.pixel_available == full.pixel_length == 512 * 512 * 2
    cut = data[:-1000]
    assert read_header(cut, len(cut), ts).pixel_available == 512 * 512 * 2 - 1000
    with pytest.raises(HeaderError):  # an element cut in half
        read_header(data[:333], 333, ts)
    assert "StudyInstanceUID" not in read_header(data[:200], 200, ts).values  # cut between elements: valid
    bad_vr = data[:4] + b"ZZ" + data[6:]
    with pytest.raises(HeaderError):
        read_header(bad_vr, len(bad_vr), ts)
    swapped = data[8 + struct.unpack("<H", data[6:8])[0]:]  # drop the first element: fine
    assert read_header(swapped, len(swapped), ts).values["SOPInstanceUID"] == full.values["SOPInstanceUID"]
    with pytest.raises(HeaderError):  # the deflated syntax is left to pydicom
        read_header(data, len(data), "1.2.840.10008.1.2.1.99")
