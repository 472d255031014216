"""Reading a series' files: headers, then pixel data decoded straight into the volume's float32 array.

Uncompressed transfer syntaxes (Implicit/Explicit VR Little Endian, Explicit VR Big Endian) with 8, 16 or 32
bits allocated take a fast path: the header is parsed up to the Pixel Data element (whose value offset is
recorded), and the value is later read from the file with one ``readinto`` into a reused buffer, the unused
high bits corrected as pydicom does (shift left then right by BitsAllocated - BitsStored: masked when
unsigned, sign-extended when signed), and rescaled into its slice of the output. Everything else (JPEG,
JPEG-LS, JPEG 2000, RLE, deflate, 1-bit) is read whole and decoded by pydicom's pixel handlers (pylibjpeg,
openjpeg, pyjpegls, rle), in a thread pool since those decoders release the GIL. Both paths store values
through :func:`store_frame`, so a series gives bit-identical volumes whatever its transfer syntax.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.errors import VolumeError
from dicomnode.imaging.frames import Frame

AIR_HU = -1000.0
OUTSIDE_SCAN_HU = -2000.0  # CT values <= this (after rescale) mark "outside the scan field": set to air
PIXEL_DATA_TAG = (0x7FE0, 0x0010)
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ"}  # 4-byte explicit VR length


@dataclass(frozen=True)
class NativePixels:
    """Where an uncompressed Pixel Data value lies in its file, and how to read it."""

    offset: int  # byte offset of the value's first byte in the file
    dtype: np.dtype[Any]  # stored value type with the file's byte order
    count: int  # number of stored values: frames x rows x columns
    bit_shift: int  # BitsAllocated - BitsStored


@dataclass(frozen=True)
class SourceFile:
    """One file's header (never with Pixel Data once loading is done) and, when uncompressed, its pixels."""

    path: Path
    dataset: Dataset
    native: NativePixels | None  # None: pixel data is in ``dataset`` and decoded by pydicom


def fill_value(modality: str) -> float:
    """What padding and outside-the-scan pixels become: air (-1000 HU) for CT, else 0."""
    return AIR_HU if modality == "CT" else 0.0


def read_file(path: Path) -> SourceFile:
    """Read the header of one file; uncompressed pixel data is located, not read (VolumeError: no image)."""
    try:
        with Path(path).open("rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            native = _locate_native(ds, fh, syntax) if syntax in NATIVE_SYNTAXES else None
            if native is None:
                fh.seek(0)
                ds = pydicom.dcmread(fh)
    except (InvalidDicomError, OSError, ValueError, struct.error) as exc:
        raise VolumeError(f"not a readable DICOM file: {Path(path).name} ({exc})") from exc
    if native is None and "PixelData" not in ds:
        raise VolumeError(f"not an image (no Pixel Data): {Path(path).name} ({ds.get('SOPClassUID', '?')})")
    return SourceFile(Path(path), ds, native)


def _locate_native(ds: Dataset, fh: Any, syntax: str) -> NativePixels | None:
    """Parse the Pixel Data element header at the file position where pydicom stopped. None: not for the
    fast path (no pixel data, encapsulated, unusual bit depth, too short): pydicom decodes or reports it."""
    big = syntax == ExplicitVRBigEndian
    endian = ">" if big else "<"
    start = fh.tell()
    head = fh.read(12)
    if len(head) < 8 or struct.unpack(endian + "HH", head[:4]) != PIXEL_DATA_TAG:
        return None
    if syntax == ImplicitVRLittleEndian:
        (length,), value_at = struct.unpack("<L", head[4:8]), start + 8
    elif head[4:6] in _LONG_VRS:
        (length,), value_at = struct.unpack(endian + "L", head[8:12]), start + 12
    else:
        (length,), value_at = struct.unpack(endian + "H", head[6:8]), start + 8
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        count = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return None
    unusual = allocated not in (8, 16, 32) or (allocated == 8 and big) or not 0 < stored <= allocated
    if unusual or samples != 1:
        return None
    if length == 0xFFFFFFFF or length < count * allocated // 8:
        return None
    dtype = np.dtype(f"{endian}{'i' if signed else 'u'}{allocated // 8}")
    return NativePixels(value_at, dtype, count, allocated - stored)


def read_all(paths: Sequence[Path]) -> list[SourceFile]:
    """Headers of every file, in the order given. Serial: header parsing holds the GIL, threads only add
    contention."""
    if not paths:
        raise VolumeError("no files given")
    return [read_file(Path(p)) for p in paths]


# ------------------------------------------------------------------------------------------------ decoding
def store_frame(raw: npt.NDArray[Any], dst: npt.NDArray[np.float32], frame: Frame,
                padding: Callable[[npt.NDArray[Any]], npt.NDArray[np.bool_] | None], modality: str) -> None:
    """Stored values ``raw`` (rows, cols) -> rescaled float32 in ``dst``; padding and outside-scan to fill.

    The arithmetic is float32 ``raw * slope + intercept`` (the multiply skipped when slope is 1): exactly what
    a pydicom loop computes with ``astype(np.float32) * slope + intercept``.
    """
    fill = np.float32(fill_value(modality))
    if frame.slope == 1.0:
        np.add(raw, np.float32(frame.intercept), out=dst, dtype=np.float32)
    else:
        np.multiply(raw, frame.slope, out=dst, casting="unsafe")
        if frame.intercept != 0.0:
            dst += np.float32(frame.intercept)
    pad = padding(raw)
    if pad is not None:
        dst[pad] = fill
    if modality == "CT" and float(dst.min()) <= OUTSIDE_SCAN_HU:
        np.putmask(dst, dst <= OUTSIDE_SCAN_HU, fill)


def _padding_of(ds: Dataset) -> Callable[[npt.NDArray[Any]], npt.NDArray[np.bool_] | None]:
    """PixelPaddingValue (and PixelPaddingRangeLimit) of ``ds`` as a function of the stored values."""
    if "PixelPaddingValue" not in ds:
        return lambda raw: None
    pad = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        lo, hi = sorted((pad, int(ds.PixelPaddingRangeLimit)))
        return lambda raw: np.asarray((raw >= lo) & (raw <= hi))
    return lambda raw: np.asarray(raw == pad)


def _native_array(source: SourceFile, native: NativePixels, scratch: bytearray) -> npt.NDArray[Any]:
    """The stored values of an uncompressed file, (frames, rows, cols), read into ``scratch``."""
    nbytes = native.count * native.dtype.itemsize
    view = memoryview(scratch)[:nbytes]
    with source.path.open("rb") as fh:
        fh.seek(native.offset)
        got = fh.readinto(view)
    if got != nbytes:
        raise VolumeError(f"pixel data truncated: {source.path.name} has {got} of {nbytes} bytes")
    arr = np.frombuffer(view, dtype=native.dtype)
    if native.bit_shift:
        np.left_shift(arr, native.bit_shift, out=arr)
        np.right_shift(arr, native.bit_shift, out=arr)
    ds = source.dataset
    return arr.reshape((-1, int(ds.Rows), int(ds.Columns)))


def _decoded_array(ds: Dataset) -> npt.NDArray[Any]:
    """Stored values of all frames, (frames, rows, cols), decoded by pydicom's handlers."""
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(f"cannot decode pixel data ({syntax}): {exc}") from exc
    return arr.reshape((-1, int(ds.Rows), int(ds.Columns)))


def stored_values(source: SourceFile) -> npt.NDArray[Any]:
    """The stored (not rescaled) values of one file, (frames, rows, cols), as pydicom's ``pixel_array`` gives
    them, by whichever path :func:`decode_stack` takes for it."""
    if source.native is None:
        return _decoded_array(source.dataset)
    native = source.native
    return _native_array(source, native, bytearray(native.count * native.dtype.itemsize))


_Job = tuple[SourceFile, list[tuple[int, Frame]]]  # a file and the (slice k, frame) pairs it fills


def _decode_jobs(jobs: Sequence[_Job], out: npt.NDArray[np.float32], modality: str) -> None:
    """Decode files into their slices of ``out``, reusing one read buffer for uncompressed files."""
    scratch = bytearray(max((j[0].native.count * j[0].native.dtype.itemsize for j in jobs
                             if j[0].native is not None), default=0))
    for source, targets in jobs:
        if source.native is not None:
            arr = _native_array(source, source.native, scratch)
        else:
            arr = _decoded_array(source.dataset)
            del source.dataset.PixelData  # the volume keeps headers only
        padding = _padding_of(source.dataset)
        for k, frame in targets:
            store_frame(arr[frame.frame_index or 0], out[k], frame, padding, modality)


def decode_stack(sources: Sequence[SourceFile], ordered: Sequence[Frame], modality: str, workers: int,
                 ) -> npt.NDArray[np.float32]:
    """Decode every file once into a preallocated (z, y, x) float32 array with rescale and padding applied.

    Uncompressed files are read in this thread (memory-bound: threads do not pay); compressed files are
    decoded by ``workers`` threads.
    """
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=np.float32)
    by_file: dict[int, list[tuple[int, Frame]]] = {}
    for k, frame in enumerate(ordered):
        by_file.setdefault(frame.file_index, []).append((k, frame))
    jobs = [(sources[i], targets) for i, targets in by_file.items()]
    native = [job for job in jobs if job[0].native is not None]
    encoded = [job for job in jobs if job[0].native is None]
    _decode_jobs(native, out, modality)
    if workers <= 1 or len(encoded) < 8:
        _decode_jobs(encoded, out, modality)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda job: _decode_jobs([job], out, modality), encoded))
    return out
