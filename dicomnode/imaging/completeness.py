"""Evidence that the instances received for a series form a complete volume (used when its sender released).

DICOM has no "series complete" message. When the association that sent a series is released, the node may
judge it complete at once if the received images themselves say so (:func:`judge_stack`):

- every frame (single-frame images, or the frames of enhanced multi-frame objects' functional groups) has
  ImagePositionPatient and ImageOrientationPatient, and all share one orientation;
- their positions along the slice normal are distinct and evenly spaced (each step within 1 % and 0.01 mm of
  the median step, so there is no gap and no duplicate);
- where the instances state ImagesInAcquisition (0020,1002), their number equals it; an enhanced object's
  frames are counted through NumberOfFrames and its per-frame positions.

Anything else (one image, no geometry, a gap, a count short of the stated one, an unreadable header) is "no
evidence": the caller falls back to the quiet period. Only headers are read, never pixel data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.errors import VolumeError
from dicomnode.imaging.frames import Frame, frames_of

ORIENTATION_TOLERANCE = 1e-3  # direction cosines
STEP_RELATIVE_TOLERANCE = 0.01
STEP_ABSOLUTE_TOLERANCE_MM = 0.01
# Only what the frames' geometry needs is parsed (about a third faster than whole headers).
_HEADER_TAGS = ["SOPInstanceUID", "SOPClassUID", "SamplesPerPixel", "Rows", "Columns", "NumberOfFrames",
                "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                "RescaleIntercept", "RescaleType", "ImagesInAcquisition", "PerFrameFunctionalGroupsSequence",
                "SharedFunctionalGroupsSequence"]


@dataclass(frozen=True)
class Evidence:
    """The verdict on a series' received instances: ``complete`` and the reason, for events and ``show``."""

    complete: bool
    reason: str


def _stated_count(headers: Sequence[Dataset]) -> int | None:
    """ImagesInAcquisition when every single-frame instance states the same value, else None."""
    values = {h.get("ImagesInAcquisition") for h in headers}
    if len(values) != 1:
        return None
    value = values.pop()
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frames(paths: Sequence[Path]) -> tuple[list[Frame], list[Dataset]]:
    headers: list[Dataset] = [pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
                              for path in paths]
    frames: list[Frame] = []
    for index, (ds, path) in enumerate(zip(headers, paths, strict=True)):
        frames.extend(frames_of(index, ds, path))
    return frames, headers


def judge_frames(frames: Sequence[Frame], stated: int | None) -> Evidence:
    """The verdict on frames already read (see the module doc); ``stated`` is ImagesInAcquisition or None."""
    if len(frames) < 2:
        return Evidence(False, "a single image: no geometry to judge")
    first = frames[0].orientation
    if any(np.max(np.abs(f.orientation - first)) > ORIENTATION_TOLERANCE for f in frames[1:]):
        return Evidence(False, "more than one orientation")
    normal = np.cross(first[:3], first[3:])
    along = np.sort(np.array([float(np.dot(f.position, normal)) for f in frames]))
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= STEP_ABSOLUTE_TOLERANCE_MM:
        return Evidence(False, "duplicate slice positions")
    allowed = max(STEP_RELATIVE_TOLERANCE * median, STEP_ABSOLUTE_TOLERANCE_MM)
    worst = float(np.max(np.abs(steps - median)))
    if worst > allowed:
        return Evidence(False, f"slices not evenly spaced (a step differs by {worst:.2f} mm from the "
                               f"{median:.2f} mm median): a gap, or unequal spacing")
    if stated is not None and stated != len(frames):
        return Evidence(False, f"{len(frames)} of the {stated} images the instances state (ImagesInAcquisition)")
    count = f", ImagesInAcquisition {stated}" if stated is not None else ""
    return Evidence(True, f"{len(frames)} slices, one orientation, evenly spaced {median:.2f} mm{count}")


def judge_stack(paths: Sequence[Path]) -> Evidence:
    """Whether the files at ``paths`` (one series) form a complete volume, from their headers alone."""
    try:
        frames, headers = _frames(paths)
    except (VolumeError, OSError, ValueError, AttributeError, TypeError, KeyError) as exc:
        return Evidence(False, f"no geometry evidence: {exc}")
    except Exception as exc:  # pydicom raises many types on damaged files: no evidence, never a crash
        return Evidence(False, f"no geometry evidence: unreadable header ({type(exc).__name__})")
    multi_frame = any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers)
    return judge_frames(frames, None if multi_frame else _stated_count(headers))
