"""What the framework adapters (nnU-Net, TotalSegmentator, MONAI bundles) share: the NIfTI view of a Volume,
model identity, label descriptions, and keeping the frameworks' prints out of the node's stdout.

The frameworks are trained on NIfTI files, so the adapters feed each one the array it would read from the NIfTI
that ``dicomnode convert`` writes for the series (:mod:`dicomnode.imaging.nifti`: storage order (i, Rows-1-j, k),
RAS affine), but from memory: :func:`nifti_view` gives that storage array (a view, no copy) and its affine,
:func:`from_nifti_view` puts an array in storage order back onto the Volume's (z, y, x) grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.config import LabelCode
from dicomnode.errors import PipelineError
from dicomnode.imaging.codes import coded_label
from dicomnode.imaging.labels import LabelInfo
from dicomnode.imaging.nifti import nifti_affine, to_nifti_order
from dicomnode.imaging.volume import Volume
from dicomnode.inference.loaders import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What ``dicomnode models`` reports and the outputs are stamped with: name, version (from the model's own
    metadata, else ``sha256:<12 hex>`` of its weights), kind, source path, labels (value -> name), device."""

    name: str
    version: str
    kind: str
    source: str
    labels: Mapping[int, str] = field(default_factory=dict)
    device: str = "cpu"


def nifti_view(volume: Volume) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """(array in NIfTI storage order (i, Rows-1-j, k), RAS affine): what a NIfTI reader gets from the file
    ``dicomnode convert`` writes, without writing it. The array is a view of ``volume.data``."""
    return to_nifti_order(volume.data), nifti_affine(volume)


def from_nifti_view(array: npt.NDArray[Any], shape: tuple[int, int, int]) -> npt.NDArray[Any]:
    """The inverse of :func:`nifti_view`'s array order: storage (i, Rows-1-j, k) -> (z, y, x) of ``shape``."""
    out = np.transpose(np.asarray(array)[:, ::-1, :], (2, 1, 0))
    if out.shape != shape:
        raise PipelineError(f"model output {out.shape} does not match the volume {shape}")
    return np.ascontiguousarray(out)


def weights_hash(paths: Iterable[Path]) -> str:
    """``sha256:<first 12 hex digits>`` over the bytes of ``paths`` in sorted order: a version for weights
    that carry none."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:12]}"


def label_infos(names: Mapping[int, str], codes: Iterable[LabelCode] = ()) -> tuple[LabelInfo, ...]:
    """LabelInfo per (value >= 1, name), coded from the SNOMED CT table (with the config's ``codes``)."""
    extra = tuple(codes)
    out = []
    for value, name in sorted(names.items()):
        if not 1 <= value <= 255:
            raise ModelLoadError(f"label value {value} ({name!r}) is outside 1-255")
        out.append(coded_label(value, name, extra))
    return tuple(out)


@contextlib.contextmanager
def quiet_stdout(what: str) -> Iterator[None]:
    """Run a framework call with its prints captured (they would corrupt ``--json`` output and the node's
    log format) and logged at DEBUG afterwards. Not for concurrent use from several threads."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            log.debug("%s printed: %s", what, text[-2000:])
