"""Read-back check of every derived object before it leaves the node.

:func:`check_output` writes the dataset as a DICOM Part 10 file into memory, reads it back, validates every
element's value against its VR (PS3.5 6.2, pydicom's ``validate_value`` in RAISE mode, nested sequences
included; the error names the attribute, never its value) and checks:

- the identifiers every PACS needs: SOP Class/Instance, Study/Series Instance UIDs (valid UIDs), Patient ID
  (present, may be empty), Modality, Series/Instance Number, and that the file meta matches the dataset;
- SEG: highdicom reads it back (``Segmentation.from_dataset``), segment numbers are 1..N and every
  segment has at least one frame;
- SR: highdicom reads it back (``hd.sr.srread``) and the content root is a TID 1500 container;
- SC: the pixel data decode to (Rows, Columns, 3) and BurnedInAnnotation is YES;
- RTSTRUCT: ROI numbers unique, each ROI with contours and an observation, on a Frame of Reference the
  structure set references; every contour CLOSED_PLANAR with NumberOfContourPoints points (at least 3) that
  lie on one plane, and every image a contour references listed among the referenced series' images.

Any failure raises :class:`~dicomnode.errors.PipelineError` naming the object (class, SOP Instance UID)
and the problem; on success the checked Part 10 bytes are returned (what a caller may write or send as is).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, SecondaryCaptureImageStorage
from pydicom.valuerep import validate_value

from dicomnode.errors import PipelineError

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_PLANE_TOLERANCE_MM = 0.01
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
             "SeriesNumber", "InstanceNumber")


_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
# VRs whose raw value is text, validated from the bytes as written (no conversion to pydicom's value types,
# which costs more than the check itself on a SEG with hundreds of per-frame functional groups).
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_MULTI_VALUED = _TEXT_VRS - {"LT", "ST", "UT", "UR"}  # backslash separates values (PS3.5 6.4)


def _value_text(value: Any) -> Any:
    """The value as it was encoded: number strings (DS, IS) and person names keep their original text."""
    original = getattr(value, "original_string", None)
    if isinstance(original, bytes):
        return original.decode("latin-1")
    return value if original is None else original


def _fail(name: str, vr: str, exc: Exception) -> ValueError:
    what = str(exc).split(":")[0].split("(")[0].strip() or "invalid value"
    return ValueError(f"{name} ({vr}): {what}")


def _check_raw(name: str, vr: str, raw: bytes, encoding: str) -> None:
    try:
        text = raw.decode(encoding).rstrip(" \0")  # padding: a space, or NUL for UI (PS3.5 6.2)
    except UnicodeDecodeError as exc:
        raise _fail(name, vr, exc) from None
    for value in text.split("\\") if vr in _MULTI_VALUED else [text]:
        if value:
            try:
                validate_value(vr, value, RAISE)
            except (ValueError, TypeError) as exc:
                raise _fail(name, vr, exc) from None


def _check_converted(name: str, vr: str, value: Any) -> None:
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    for item in values:
        try:
            validate_value(vr, _value_text(item), RAISE)
        except (ValueError, TypeError) as exc:
            raise _fail(name, vr, exc) from None


def validate_values(ds: Dataset, encoding: str | None = None) -> None:
    """ValueError naming the first element (nested ones included) whose value breaks its VR's rules.

    Explicit per element, so no process-global validation mode is flipped; text values are checked from the
    bytes read back where they are still raw (sequences are parsed to reach their items); the message never
    quotes the value (it may be a patient's name)."""
    if encoding is None:
        charset = ds.get("SpecificCharacterSet", "")
        encoding = "utf-8" if "192" in str(charset) else "latin-1"
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if elem is None or tag.is_private:
            continue
        vr = elem.VR or dictionary_VR(tag)
        name = keyword_for_tag(tag) or str(tag)
        if vr == "SQ":
            for item in ds[tag].value or ():
                validate_values(item, encoding)
        elif vr not in _TEXT_VRS:
            continue
        elif isinstance(elem, RawDataElement):
            if elem.value:
                _check_raw(name, vr, bytes(elem.value), encoding)
        elif not elem.is_empty:
            _check_converted(name, vr, elem.value)


def encode_strict(ds: Dataset) -> tuple[bytes, Dataset]:
    """``ds`` as Part 10 bytes and those bytes parsed back, both with strict validation (PipelineError if not).

    The returned dataset is a fresh object owned by the caller (nothing is shared with ``ds``), so checks
    may consume it without copying.
    """
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
        encoded = buffer.getvalue()
        back = pydicom.dcmread(BytesIO(encoded))
        validate_values(back)
    except Exception as exc:  # pydicom raises ValueError, KeyError, TypeError, InvalidDicomError, ...
        raise PipelineError(f"{_name(ds)}: does not survive a strict write/read: {exc}") from exc
    return encoded, back


def round_trip(ds: Dataset) -> Dataset:
    """``ds`` written as a Part 10 file and read back with every value validated (PipelineError if not)."""
    return encode_strict(ds)[1]


def _name(ds: Dataset) -> str:
    return f"{getattr(ds, 'SOPClassUID', '?')!s} {getattr(ds, 'SOPInstanceUID', '?')!s}"


def _check_identifiers(ds: Dataset) -> None:
    missing = [kw for kw in _REQUIRED if kw not in ds or ds[kw].value in (None, "")]
    if missing:
        raise PipelineError(f"{_name(ds)}: missing {', '.join(missing)}")
    if "PatientID" not in ds:
        raise PipelineError(f"{_name(ds)}: missing PatientID")
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not UID(str(ds[kw].value)).is_valid:
            raise PipelineError(f"{_name(ds)}: {kw} {ds[kw].value!r} is not a valid UID")
    meta = ds.file_meta
    if (meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
            or meta.MediaStorageSOPClassUID != ds.SOPClassUID):
        raise PipelineError(f"{_name(ds)}: file meta does not match the dataset's SOP class/instance")


def _frame_segment_numbers(seg: Dataset) -> list[int]:
    """The segment number of each frame. Segment Identification is a functional group: per frame, or in the
    shared functional groups when every frame belongs to the same segment (highdicom writes a one-segment SEG
    that way, as PS3.3 C.7.6.16 allows)."""
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()
    numbers = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        group = item if "SegmentIdentificationSequence" in item else shared
        numbers.append(int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
    return numbers


def _check_seg(ds: Dataset) -> None:
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        numbers = list(seg.get_segment_numbers())
        frames = _frame_segment_numbers(seg)
    except Exception as exc:  # highdicom raises many types on malformed input
        raise PipelineError(f"{_name(ds)}: highdicom cannot read the SEG back: {exc}") from exc
    if numbers != list(range(1, len(numbers) + 1)) or not numbers:
        raise PipelineError(f"{_name(ds)}: segment numbers {numbers} are not 1..N")
    empty = sorted(set(numbers) - set(frames))
    if empty:
        raise PipelineError(f"{_name(ds)}: segments {empty} have no frames")


def _check_sr(ds: Dataset) -> None:
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)
        template = sr.ContentTemplateSequence[0].TemplateIdentifier
    except Exception as exc:
        raise PipelineError(f"{_name(ds)}: highdicom cannot read the SR back: {exc}") from exc
    if template != "1500":
        raise PipelineError(f"{_name(ds)}: SR content template is {template}, not TID 1500")


def _check_sc(ds: Dataset) -> None:
    if ds.get("BurnedInAnnotation") != "YES":
        raise PipelineError(f"{_name(ds)}: SC pictures carry text, BurnedInAnnotation must be YES")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise PipelineError(f"{_name(ds)}: SC pixel data cannot be decoded: {exc}") from exc
    if pixels.shape != (ds.Rows, ds.Columns, 3) or pixels.dtype != np.uint8:
        raise PipelineError(f"{_name(ds)}: SC pixels are {pixels.shape} {pixels.dtype}, not RGB uint8")


def _check_rtstruct(ds: Dataset) -> None:
    try:
        frames = {str(f.FrameOfReferenceUID): f for f in ds.ReferencedFrameOfReferenceSequence}
        images = {str(i.ReferencedSOPInstanceUID) for f in frames.values() for st in f.RTReferencedStudySequence
                  for se in st.RTReferencedSeriesSequence for i in se.ContourImageSequence}
        rois = [int(r.ROINumber) for r in ds.StructureSetROISequence]
        roi_frames = {str(r.ReferencedFrameOfReferenceUID) for r in ds.StructureSetROISequence}
        observed = {int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence}
        contoured = {int(c.ReferencedROINumber): list(c.get("ContourSequence", [])) for c in ds.ROIContourSequence}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{_name(ds)}: RT Structure Set cannot be read back: {exc}") from exc
    if not rois or len(set(rois)) != len(rois):
        raise PipelineError(f"{_name(ds)}: ROI numbers {rois} are missing or not unique")
    if roi_frames - set(frames):
        raise PipelineError(f"{_name(ds)}: ROIs lie on a Frame of Reference the structure set does not reference")
    for number in rois:
        if number not in observed or not contoured.get(number):
            raise PipelineError(f"{_name(ds)}: ROI {number} has no contours or no observation")
        for contour in contoured[number]:
            _check_contour(ds, number, contour, images)


def _check_contour(ds: Dataset, number: int, contour: Dataset, images: set[str]) -> None:
    where = f"{_name(ds)}: ROI {number} contour {contour.get('ContourNumber', '?')}"
    points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
    n = int(contour.NumberOfContourPoints)
    if contour.ContourGeometricType != "CLOSED_PLANAR" or n < 3 or points.size != 3 * n:
        raise PipelineError(f"{where}: not a CLOSED_PLANAR contour of NumberOfContourPoints (>= 3) points")
    xyz = points.reshape(n, 3)
    xyz = xyz - xyz.mean(axis=0)
    normal = np.linalg.svd(xyz, full_matrices=False)[2][-1]  # of the best-fitting plane
    if np.abs(xyz @ normal).max() > _PLANE_TOLERANCE_MM:
        raise PipelineError(f"{where}: its points do not lie on one plane")
    refs = {str(i.ReferencedSOPInstanceUID) for i in contour.get("ContourImageSequence", [])}
    if refs - images:
        raise PipelineError(f"{where}: references an image the referenced series does not list")


def check_output(ds: Dataset) -> bytes:
    """The Part 10 bytes of ``ds``; PipelineError unless they read back strictly and pass the checks (module doc).

    The checks run on the dataset parsed from the returned bytes (not on ``ds``), so what is checked is
    exactly what would be sent; the parsed copy is consumed by the checks, ``ds`` is left untouched.
    """
    encoded, back = encode_strict(ds)
    _check_identifiers(back)
    sop_class = str(back.SOPClassUID)
    if sop_class == SEG_CLASS:
        _check_seg(back)
    elif sop_class == SR_3D_CLASS:
        _check_sr(back)
    elif sop_class == SecondaryCaptureImageStorage:
        _check_sc(back)
    elif sop_class == RTSTRUCT_CLASS:
        _check_rtstruct(back)
    return encoded
