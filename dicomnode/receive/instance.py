"""What a received data set is, read without decoding pixels: its identifying attributes, checked against its
C-STORE request, its pixel data's length checked against its image description, and the Part 10 file meta group
it is stored behind.

Statuses (PS3.4 B.2.3): ``0xA900`` the data set's SOP Class/Instance UID disagree with the request, or an image
lacks (some of) its pixel data; ``0xC000`` the data set cannot be parsed, lacks Study/Series/SOP Instance UIDs, or
holds a UID that is not a valid UID (a final newline included).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.receive.header import (
    DEFLATED_LE,
    DOUBLE_PIXEL_DATA,
    FLOAT_PIXEL_DATA,
    PIXEL_DATA,
    WANTED,
    Header,
    HeaderError,
    read_header,
)
from dicomnode.receive.upper_layer import StoreRequest
from dicomnode.state.spool import IncomingFile, is_valid_uid
from dicomnode.state.store import InstanceMeta

DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class Refusal(Exception):
    """The instance is refused with ``status``; the message is the Error Comment (no paths in it)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_PIXEL_TAGS = {PIXEL_DATA: "PixelData", FLOAT_PIXEL_DATA: "FloatPixelData", DOUBLE_PIXEL_DATA: "DoubleFloatPixelData"}


def _header_with_pydicom(path: Path, size: int, transfer_syntax: str) -> Header:
    """The same :class:`Header` from pydicom's full parse: for what the fast walk leaves alone."""
    try:
        # Deferred values are found again by file offset, which means nothing inside a deflated stream.
        ds = pydicom.dcmread(path, defer_size=None if transfer_syntax == DEFLATED_LE else 1024)
        values: dict[str, str | int] = {}
        for keyword in WANTED.values():
            if keyword in ds:
                value = ds[keyword].value
                values[keyword] = value if isinstance(value, int) else _text(ds, keyword)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise Refusal(CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise Refusal(CANNOT_UNDERSTAND, "data set cannot be parsed: no data element could be read")
    header = Header(values)
    present = [(tag, keyword) for tag, keyword in _PIXEL_TAGS.items() if keyword in ds]
    if present:
        header.pixel_tag, keyword = present[0]
        raw: Any = ds.get_item(keyword, keep_deferred=True)
        if getattr(raw, "value", None) is None and getattr(raw, "value_tell", None) is not None:
            header.pixel_length = None if raw.length == 0xFFFFFFFF else int(raw.length)
            header.pixel_available = max(0, min(int(raw.length), size - int(raw.value_tell)))  # what the file holds
        else:
            header.pixel_length = header.pixel_available = len(ds[keyword].value or b"")
    return header


# Photometric interpretations whose chroma is sampled once per two pixels of a row: in native (uncompressed)
# encoding each pair of pixels carries Y Y Cb Cr, two samples per pixel instead of three (PS3.3 C.7.6.3.1.2).
_HALF_CHROMA = {"YBR_FULL_422", "YBR_PARTIAL_422"}


def expected_pixel_bytes(values: dict[str, str | int]) -> int:
    """Bytes of native Pixel Data an image's description calls for (PS3.5 8.1.1, PS3.3 C.7.6.3.1.2):
    Rows x Columns x frames x samples x Bits Allocated, in bits, rounded up to whole bytes (Bits Allocated 1
    packs 8 pixels per byte), with two samples per pixel for the 4:2:2 YBR interpretations. The value's pad byte
    to an even length is not counted. Raises KeyError/ValueError when the description cannot be read."""
    frames = int(str(values.get("NumberOfFrames") or 1))
    samples = int(values.get("SamplesPerPixel", 1))
    if samples == 3 and str(values.get("PhotometricInterpretation", "")).strip() in _HALF_CHROMA:
        samples = 2
    bits = int(values["Rows"]) * int(values["Columns"]) * frames * samples * int(values["BitsAllocated"])
    return (bits + 7) // 8


def _pixel_problem(header: Header, transfer_syntax: str) -> str | None:
    """Cheap check of an image's pixel data (lengths only, nothing decoded): catches truncation."""
    values = header.values
    if "Rows" not in values or "Columns" not in values:
        return None  # not an image (SR, presentation state, ...)
    if header.pixel_tag is None:
        return "image data set (Rows/Columns present) has no Pixel Data"
    if header.pixel_tag != PIXEL_DATA or transfer_syntax not in _UNCOMPRESSED:
        return None
    try:
        expected = expected_pixel_bytes(values)
    except (KeyError, ValueError) as exc:
        return f"image pixel description cannot be read: {type(exc).__name__}: {exc}"
    if header.pixel_length is None:
        return "native Pixel Data of undefined length"
    if header.pixel_available < expected:
        return f"Pixel Data has {header.pixel_available} bytes, the image description needs {expected}"
    return None


def read_meta(incoming: IncomingFile, meta_length: int, calling_aet: str, request: StoreRequest) -> InstanceMeta:
    """The identifying header attributes of a received instance (written, not yet committed), checked: raises
    :class:`Refusal` with the DIMSE status and the reason when the instance is not to be stored."""
    size = incoming.size - meta_length
    header: Header | None = None
    if size > 0:
        with incoming.contents() as whole:
            view = whole[meta_length:]
            try:
                header = read_header(view, size, request.transfer_syntax)
            except HeaderError:
                header = None  # pydicom decides, and names the problem
            finally:
                view.release()
    if header is None:
        incoming.flush()
        header = _header_with_pydicom(incoming.path, incoming.size, request.transfer_syntax)
    uids = {k: str(header.values.get(k, "")) for k in
            ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    extra = {k: str(header.values.get(k, "")) for k in
             ("Modality", "BodyPartExamined", "SeriesDescription", "ImageType")}
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uids[k]]
    if missing:
        raise Refusal(CANNOT_UNDERSTAND, f"data set lacks {', '.join(missing)}")
    bad = [k for k, v in uids.items() if v and not is_valid_uid(v)]
    if bad:
        raise Refusal(CANNOT_UNDERSTAND, f"invalid UID in {', '.join(bad)}")
    if uids["SOPInstanceUID"] != request.sop_instance_uid:
        raise Refusal(DATASET_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
    if uids["SOPClassUID"] and uids["SOPClassUID"] != request.sop_class_uid:
        raise Refusal(DATASET_MISMATCH, "SOPClassUID differs from the request's Affected SOP Class UID")
    problem = _pixel_problem(header, request.transfer_syntax)
    if problem:
        raise Refusal(DATASET_MISMATCH, problem)
    return InstanceMeta(
        sop_uid=uids["SOPInstanceUID"], sop_class_uid=request.sop_class_uid,
        series_uid=uids["SeriesInstanceUID"], study_uid=uids["StudyInstanceUID"],
        transfer_syntax=request.transfer_syntax, modality=extra["Modality"],
        body_part=extra["BodyPartExamined"], description=extra["SeriesDescription"],
        image_type=extra["ImageType"], calling_aet=calling_aet)


def _meta_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sxxL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(request: StoreRequest, source_aet: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1) for a received data set."""
    elements = (
        _meta_element(2, 0x0001, b"OB", b"\x00\x01")
        + _meta_element(2, 0x0002, b"UI", _even(request.sop_class_uid, b"\x00"))
        + _meta_element(2, 0x0003, b"UI", _even(request.sop_instance_uid, b"\x00"))
        + _meta_element(2, 0x0010, b"UI", _even(request.transfer_syntax, b"\x00"))
        + _meta_element(2, 0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID, b"\x00"))
        + _meta_element(2, 0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME, b" ")))
    if source_aet:
        elements += _meta_element(2, 0x0016, b"AE", _even(source_aet, b" "))
    return b"\x00" * 128 + b"DICM" + _meta_element(2, 0x0000, b"UL", struct.pack("<L", len(elements))) + elements
