"""The Volume: a series' voxels with the geometry that places them in the patient.

Contract (every stage after loading relies on it):

- ``data`` is a float32 array indexed ``data[k, j, i]`` = (slice, row, column), i.e. (z, y, x).
- ``affine`` is a 4x4 float64 matrix mapping the *array index* ``(k, j, i, 1)`` to the centre of that voxel in
  patient LPS coordinates in millimetres (DICOM patient coordinate system: +x towards patient Left, +y towards
  Posterior, +z towards Superior). Column 0 is the slice step, column 1 the row step (down a column of the
  image, i.e. ImageOrientationPatient[3:6] * PixelSpacing[0]), column 2 the column step
  (ImageOrientationPatient[0:3] * PixelSpacing[1]), column 3 the position of voxel (0, 0, 0).
- Slices are ordered by increasing projection of ImagePositionPatient on the slice normal
  (row direction x column direction), never by InstanceNumber or file name.
- CT values are Hounsfield units (RescaleSlope/Intercept applied per slice); other modalities are in the
  scanner's units after any rescale. ``units`` says which.
- ``slices[k]`` names the source instance (and 1-based frame number for multi-frame objects) of slice k. When
  the volume was resampled onto a new grid (gantry tilt, unequal spacing) slices no longer map one-to-one to
  sources and ``slices`` is empty; ``sources`` always lists every source instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from scipy import ndimage

from dicomnode.errors import VolumeError


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of a volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based frame of a multi-frame object; None for single-frame images


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel data (z, y, x) float32 with a 4x4 index-to-LPS-mm affine. See the module docstring."""

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    modality: str
    units: str  # "HU" for CT, otherwise a description such as "MR signal"
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slices: tuple[SliceSource, ...]  # one per slice k, or empty when resampled (see module docstring)
    sources: tuple[SliceSource, ...]  # every source instance/frame, in slice order where that exists
    headers: tuple[Dataset, ...] = field(repr=False)  # source datasets without PixelData, one per source file
    window: tuple[float, float] | None = None  # the series' own (center, width), if it has one
    notes: tuple[str, ...] = ()  # what loading did that a person should know (e.g. "tilt 18.5 deg resampled")

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.data.shape
        return (int(z), int(y), int(x))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (z, y, x): the lengths of the affine's first three columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3 matrix whose columns are the unit LPS directions of the (z, y, x) array axes."""
        return np.asarray(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0), dtype=np.float64)


# -------------------------------------------------- loading ----------------------------------------

AIR_HU = -1000.0
OUTSIDE_SCAN_HU = -2000.0  # CT values <= this (after rescale) mark "outside the scan field": set to air


@dataclass(frozen=True)
class VolumeOptions:
    """How strict :func:`load_series` is.

    ``irregular``: what to do with a gantry tilt (positions not along the slice normal) or unequal slice
    spacing: ``"resample"`` onto a regular orthogonal grid (recorded in ``Volume.notes``) or ``"reject"``
    (VolumeError).
    ``gap_factor``: a gap between neighbouring slices larger than ``gap_factor`` x the median spacing that is
    close to a whole multiple of it (2x, 3x, ...) is a missing slice and always an error.
    ``spacing_tolerance``: relative tolerance (of the median spacing, at least 0.02 mm) for "equal" spacing.
    ``tilt_tolerance_deg``: slice-position shear below this angle is treated as no tilt.
    ``workers``: threads used to read and decode files.
    """

    min_slices: int = 3
    irregular: Literal["resample", "reject"] = "resample"
    gap_factor: float = 1.5
    spacing_tolerance: float = 0.01
    tilt_tolerance_deg: float = 0.05
    workers: int = 4


@dataclass(frozen=True)
class _Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file, with its geometry and rescale."""

    file_index: int
    frame_index: int | None  # 0-based frame in a multi-frame file
    source: SliceSource
    position: npt.NDArray[np.float64]  # ImagePositionPatient, LPS mm
    orientation: npt.NDArray[np.float64]  # ImageOrientationPatient (row cosine, column cosine)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slope: float
    intercept: float
    rescale_type: str | None
    rows: int
    cols: int


def load_series_dir(folder: Path, options: VolumeOptions = VolumeOptions()) -> Volume:
    """Load every DICOM file (recognised by its 'DICM' preamble, not its name) in ``folder`` as one volume."""
    paths = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and _is_dicom_file(p)]
    if not paths:
        raise VolumeError(f"no DICOM files in {folder}")
    return load_series(paths, options=options)


def load_series(paths: Sequence[Path], *, options: VolumeOptions = VolumeOptions()) -> Volume:
    """Read the files of one series into a :class:`Volume` (z, y, x) float32 with an index-to-LPS affine.

    Slices are sorted by the projection of ImagePositionPatient on the slice normal; spacing comes from the
    positions (never SliceThickness). Pixel data is decoded once, in a thread pool, straight into the final
    float32 array, with each slice's (or frame's) RescaleSlope/Intercept applied. For CT, PixelPaddingValue
    (and the padding range) and values <= -2000 HU (outside the scan field) become air, -1000 HU; for other
    modalities padding becomes 0. Gantry tilt and unequal spacing are resampled or rejected per ``options``.

    Raises VolumeError for: not DICOM / not an image, more than one SeriesInstanceUID, mixed matrix sizes,
    mixed orientations or pixel spacings, duplicate positions, missing slices, too few slices, irregular
    geometry when ``options.irregular == "reject"``.
    """
    datasets = _read_all(paths, options.workers)
    _check_same_series(datasets)
    frames = [f for i, ds in enumerate(datasets) for f in _frames_of(i, ds, paths[i])]
    geometry = _geometry(frames, paths, options)
    ordered = [frames[k] for k in geometry.order]
    data = _decode_stack(datasets, ordered, options.workers)
    first = datasets[0]
    modality = str(first.get("Modality", ""))
    notes = list(geometry.notes)
    affine = geometry.affine
    if geometry.irregular:
        data, affine, more = _regularise(data, ordered, geometry, _fill_value(modality))
        notes.extend(more)
    for ds in datasets:
        if "PixelData" in ds:
            del ds.PixelData
    units, unit_notes = _units(modality, ordered, first)
    sources = tuple(f.source for f in ordered)
    return Volume(
        data=data,
        affine=affine,
        modality=modality,
        units=units,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        slices=() if geometry.irregular else sources,
        sources=sources,
        headers=tuple(datasets),
        window=_window(first),
        notes=tuple(notes + unit_notes),
    )


@dataclass(frozen=True)
class _Geometry:
    order: tuple[int, ...]  # frame indices in slice order
    affine: npt.NDArray[np.float64]  # of the stack as acquired (before any regularisation)
    distances: npt.NDArray[np.float64]  # position of each ordered slice along the normal, from the first, mm
    irregular: bool  # tilted or unequally spaced: needs _regularise
    tilted: bool
    notes: tuple[str, ...]


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _read_one(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise VolumeError(f"not a readable DICOM file: {Path(path).name} ({exc})") from exc
    if "PixelData" not in ds:
        raise VolumeError(f"not an image (no Pixel Data): {Path(path).name} ({ds.get('SOPClassUID', '?')})")
    return ds


def _read_all(paths: Sequence[Path], workers: int) -> list[Dataset]:
    if not paths:
        raise VolumeError("no files given")
    if workers <= 1 or len(paths) < 8:
        return [_read_one(Path(p)) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_read_one, [Path(p) for p in paths]))


def _check_same_series(datasets: Sequence[Dataset]) -> None:
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) > 1:
        raise VolumeError(f"more than one series: {len(uids)} SeriesInstanceUIDs among {len(datasets)} files")


def _functional_group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Item 0 of functional group ``name`` for ``frame`` (0-based): per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        inner = seq[index].get(name) if seq is not None and len(seq) > index else None
        if inner is not None and len(inner) > 0:
            item: Dataset = inner[0]
            return item
    return None


def _floats(value: object, count: int, what: str, name: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"not an image with geometry: {name} has no valid {what}") from exc
    if arr.shape != (count,):
        raise VolumeError(f"not an image with geometry: {name} has an invalid {what}")
    return arr


def _frames_of(index: int, ds: Dataset, path: Path) -> list[_Frame]:
    """The 2D frames of one file, with geometry from the top level or the functional groups."""
    name = Path(path).name
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"not a grayscale image: {name} has SamplesPerPixel {ds.SamplesPerPixel}")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    frames = []
    for f in range(n_frames):
        src = ds
        if multi:
            pos_item = _functional_group(ds, f, "PlanePositionSequence")
            ori_item = _functional_group(ds, f, "PlaneOrientationSequence")
            pm_item = _functional_group(ds, f, "PixelMeasuresSequence")
            pv_item = _functional_group(ds, f, "PixelValueTransformationSequence")
            if pos_item is None or ori_item is None or pm_item is None:
                raise VolumeError(f"not an image with geometry: {name} frame {f + 1} lacks plane position, "
                                  "orientation or pixel measures")
            geo = (pos_item.get("ImagePositionPatient"), ori_item.get("ImageOrientationPatient"),
                   pm_item.get("PixelSpacing"))
            src = pv_item if pv_item is not None else Dataset()
        else:
            if n_frames > 1:
                raise VolumeError(f"not supported: {name} is multi-frame without functional groups")
            geo = (ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"))
        if geo[0] is None or geo[1] is None or geo[2] is None:
            raise VolumeError(f"not an image with geometry: {name} lacks ImagePositionPatient, "
                              "ImageOrientationPatient or PixelSpacing")
        spacing = _floats(geo[2], 2, "PixelSpacing", name)
        frames.append(_Frame(
            file_index=index,
            frame_index=f if multi or n_frames > 1 else None,
            source=SliceSource(str(ds.SOPInstanceUID), str(ds.SOPClassUID), f + 1 if multi else None),
            position=_floats(geo[0], 3, "ImagePositionPatient", name),
            orientation=_floats(geo[1], 6, "ImageOrientationPatient", name),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slope=float(src.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(src.get("RescaleIntercept", 0.0) or 0.0),
            rescale_type=str(src["RescaleType"].value) if "RescaleType" in src else None,
            rows=int(ds.Rows),
            cols=int(ds.Columns),
        ))
    return frames


def _where(frame: _Frame, paths: Sequence[Path]) -> str:
    name = Path(paths[frame.file_index]).name
    return name if frame.frame_index is None else f"{name} frame {frame.frame_index + 1}"


def _check_uniform(frames: Sequence[_Frame], paths: Sequence[Path]) -> None:
    sizes = sorted({(f.rows, f.cols) for f in frames})
    if len(sizes) > 1:
        raise VolumeError(f"mixed matrix sizes: {', '.join(f'{r}x{c}' for r, c in sizes)} (rows x columns)")
    ref = frames[0]
    for f in frames[1:]:
        if not np.allclose(f.orientation, ref.orientation, atol=1e-4):
            raise VolumeError(f"mixed orientations: ImageOrientationPatient of {_where(f, paths)} "
                              f"{np.round(f.orientation, 4).tolist()} differs from {_where(ref, paths)} "
                              f"{np.round(ref.orientation, 4).tolist()}")
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise VolumeError(f"mixed pixel spacings: {f.pixel_spacing} in {_where(f, paths)} "
                              f"vs {ref.pixel_spacing} in {_where(ref, paths)}")


def _geometry(frames: Sequence[_Frame], paths: Sequence[Path], options: VolumeOptions) -> _Geometry:
    """Sort frames along the normal and check spacing: duplicates, missing slices, tilt, unequal spacing."""
    _check_uniform(frames, paths)
    row_cos, col_cos = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row_cos, col_cos)
    proj = np.array([f.position @ normal for f in frames])
    order = tuple(int(i) for i in np.argsort(proj, kind="stable"))
    pos = np.array([frames[k].position for k in order])
    dist = proj[list(order)] - proj[order[0]]
    steps = np.diff(dist)
    for k in np.flatnonzero(steps < 0.01):
        a, b = frames[order[k]], frames[order[k + 1]]
        raise VolumeError(f"duplicate positions: {_where(a, paths)} and {_where(b, paths)} both at "
                          f"{np.round(a.position, 2).tolist()} mm")
    if len(frames) < options.min_slices:
        raise VolumeError(f"too few slices: {len(frames)} (at least {options.min_slices} needed)")
    dy, dx = frames[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 1], affine[:3, 2], affine[:3, 3] = col_cos * dy, row_cos * dx, pos[0]
    if len(frames) == 1:
        ds_thick = 1.0
        affine[:3, 0] = normal * ds_thick
        return _Geometry(order, affine, dist, False, False, ("single slice: slice step set to 1 mm",))
    median = float(np.median(steps))
    _check_gaps(steps, median, [frames[k] for k in order], paths, options.gap_factor)
    tol = max(0.02, options.spacing_tolerance * median)
    unequal = bool(np.max(np.abs(steps - median)) > tol)
    shear = np.diff(pos, axis=0) - np.outer(steps, normal)
    tilt = float(np.degrees(np.max(np.arctan2(np.linalg.norm(shear, axis=1), steps))))
    tilted = tilt > options.tilt_tolerance_deg
    notes: list[str] = []
    if tilted:
        notes.append(f"gantry tilt / sheared stack: {tilt:.2f} deg between slice positions and the normal")
    if unequal:
        notes.append(f"unequal slice spacing: {steps.min():.3f}-{steps.max():.3f} mm (median {median:.3f})")
    if (tilted or unequal) and options.irregular == "reject":
        raise VolumeError("irregular geometry rejected: " + "; ".join(notes))
    affine[:3, 0] = (pos[-1] - pos[0]) / (len(frames) - 1)
    return _Geometry(order, affine, dist, tilted or unequal, tilted, tuple(notes))


def _check_gaps(steps: npt.NDArray[np.float64], median: float, ordered: Sequence[_Frame],
                paths: Sequence[Path], gap_factor: float) -> None:
    """A gap > gap_factor x median that is about a whole multiple (>= 2) of it means missing slices."""
    for k, step in enumerate(steps):
        ratio = step / median
        if ratio > gap_factor and round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.15:
            raise VolumeError(
                f"missing slices: gap of {step:.2f} mm ({ratio:.1f}x the {median:.2f} mm spacing, about "
                f"{round(ratio) - 1} slice(s) missing) between {_where(ordered[k], paths)} and "
                f"{_where(ordered[k + 1], paths)} (slices {k} and {k + 1} of {len(ordered)})")


def _fill_value(modality: str) -> float:
    return AIR_HU if modality == "CT" else 0.0


def _pixels(ds: Dataset) -> npt.NDArray[Any]:
    """Stored values of all frames, (frames, rows, cols), decoded once (pylibjpeg / pyjpegls plugins)."""
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(f"cannot decode pixel data ({syntax}): {exc}") from exc
    return arr.reshape((-1, int(ds.Rows), int(ds.Columns)))


def _padding_mask(ds: Dataset, raw: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    if "PixelPaddingValue" not in ds:
        return None
    pad = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        lo, hi = sorted((pad, int(ds.PixelPaddingRangeLimit)))
        return np.asarray((raw >= lo) & (raw <= hi))
    return np.asarray(raw == pad)


def _decode_file(ds: Dataset, targets: Sequence[tuple[int, _Frame]], out: npt.NDArray[np.float32],
                 modality: str) -> None:
    arr = _pixels(ds)
    fill = _fill_value(modality)
    for k, frame in targets:
        raw = arr[frame.frame_index or 0]
        dst = out[k]
        if frame.slope == 1.0:
            dst[...] = raw
        else:
            np.multiply(raw, frame.slope, out=dst, casting="unsafe")
        if frame.intercept != 0.0:
            dst += np.float32(frame.intercept)
        pad = _padding_mask(ds, raw)
        if pad is not None:
            dst[pad] = fill
        if modality == "CT":
            np.putmask(dst, dst <= OUTSIDE_SCAN_HU, np.float32(fill))


def _decode_stack(datasets: Sequence[Dataset], ordered: Sequence[_Frame], workers: int,
                  ) -> npt.NDArray[np.float32]:
    """Decode every file once into a preallocated (z, y, x) float32 array with rescale and padding applied."""
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=np.float32)
    by_file: dict[int, list[tuple[int, _Frame]]] = {}
    for k, frame in enumerate(ordered):
        by_file.setdefault(frame.file_index, []).append((k, frame))
    modality = str(datasets[0].get("Modality", ""))
    jobs = [(datasets[i], targets) for i, targets in by_file.items()]
    if workers <= 1 or len(jobs) < 8:
        for ds, targets in jobs:
            _decode_file(ds, targets, out, modality)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda job: _decode_file(job[0], job[1], out, modality), jobs))
    return out


def _regularise(data: npt.NDArray[np.float32], ordered: Sequence[_Frame], geometry: _Geometry, fill: float,
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], list[str]]:
    """Resample a sheared and/or unequally spaced stack onto a regular orthogonal grid, as dcm2niix does.

    1. Tilt: each slice is shifted in its own plane (linear interpolation) so that all slices stack along the
       normal; the in-plane grid grows by the total shift (whole pixels) and new pixels get ``fill``.
    2. Unequal spacing: slices are interpolated linearly along the normal onto equal steps, with dcm2niix's
       rule (nii_makeEquidistant): the smallest step, but at most twice as many slices as acquired.
    Returns (data, affine, notes); the affine's columns are normal, column cosine, row cosine.
    """
    ref = ordered[0]
    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    dy, dx = ref.pixel_spacing
    rel = np.array([f.position - ref.position for f in ordered])
    shift_rows, shift_cols = rel @ col_cos / dy, rel @ row_cos / dx
    lo_r, hi_r = int(np.floor(min(shift_rows.min(), 0) + 1e-6)), int(np.ceil(max(shift_rows.max(), 0) - 1e-6))
    lo_c, hi_c = int(np.floor(min(shift_cols.min(), 0) + 1e-6)), int(np.ceil(max(shift_cols.max(), 0) - 1e-6))
    notes: list[str] = []
    if geometry.tilted:
        n, rows, cols = data.shape
        canvas = np.full((n, rows + hi_r - lo_r, cols + hi_c - lo_c), fill, dtype=np.float32)
        for k in range(n):
            padded = np.full(canvas.shape[1:], fill, dtype=np.float32)
            padded[:rows, :cols] = data[k]
            ndimage.shift(padded, (shift_rows[k] - lo_r, shift_cols[k] - lo_c), output=canvas[k], order=1,
                          mode="constant", cval=fill)
        data = canvas
        notes.append(f"tilt corrected: slices shifted in-plane onto an orthogonal {canvas.shape[1]}x"
                     f"{canvas.shape[2]} grid (linear interpolation)")
    dist = geometry.distances
    data, step = _equidistant(data, dist)
    if len(dist) != data.shape[0] or not np.allclose(dist, np.arange(len(dist)) * step, atol=0.02):
        notes.append(f"resampled along the normal to {data.shape[0]} slices at {step:.3f} mm (linear)")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = normal * step, col_cos * dy, row_cos * dx
    affine[:3, 3] = ref.position + (lo_r * dy * col_cos if geometry.tilted else 0) + (
        lo_c * dx * row_cos if geometry.tilted else 0)
    return data, affine, notes


def _equidistant(data: npt.NDArray[np.float32], dist: npt.NDArray[np.float64],
                 ) -> tuple[npt.NDArray[np.float32], float]:
    """Linear interpolation of slices at distances ``dist`` (ascending, from 0) onto equal steps."""
    n = len(dist)
    steps = np.diff(dist)
    if np.allclose(steps, steps.mean(), atol=0.02):
        return data, float(dist[-1] / (n - 1))
    step = float(steps.min())
    count = int(np.ceil((dist[-1] - 0.5 * steps[-1]) / step))
    if count > 2 * n:
        count = 2 * n
        step = float(dist[-1] / (count - 1))
    out = np.empty((count,) + data.shape[1:], dtype=np.float32)
    for s in range(count):
        d = min(s * step, float(dist[-1]))
        hi = min(int(np.searchsorted(dist, d, side="left")), n - 1)
        lo = max(hi - 1, 0)
        w = 0.0 if hi == lo else (d - dist[lo]) / (dist[hi] - dist[lo])
        out[s] = data[lo] * np.float32(1 - w) + data[hi] * np.float32(w)
    return out, step


def _units(modality: str, ordered: Sequence[_Frame], first: Dataset) -> tuple[str, list[str]]:
    """'HU' for CT without a RescaleType (or RescaleType HU), else the RescaleType or '<modality> signal'."""
    types = {f.rescale_type for f in ordered if f.rescale_type}
    notes: list[str] = []
    rescale_type = sorted(types)[0] if types else None
    if modality == "CT" and rescale_type in (None, "HU"):
        units = "HU"
    elif rescale_type:
        units = rescale_type
        notes.append(f"values are RescaleType {rescale_type!r}, not Hounsfield units")
    else:
        units = f"{modality or 'unknown'} signal"
    rwv = _functional_group(first, 0, "RealWorldValueMappingSequence")
    if rwv is not None and "MeasurementUnitsCodeSequence" in rwv:
        code = rwv.MeasurementUnitsCodeSequence[0]
        notes.append(f"real-world value mapping available: {rwv.get('LUTExplanation', '')} "
                     f"[{code.get('CodeValue', '')}]")
    return units, notes


def _window(ds: Dataset) -> tuple[float, float] | None:
    """The series' own first (center, width), from the top level or the Frame VOI LUT functional group."""
    item: Dataset | None = ds if "WindowCenter" in ds else _functional_group(ds, 0, "FrameVOILUTSequence")
    if item is None or "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    center, width = item.WindowCenter, item.WindowWidth
    center = center[0] if isinstance(center, MultiValue) else center
    width = width[0] if isinstance(width, MultiValue) else width
    return (float(center), float(width))
