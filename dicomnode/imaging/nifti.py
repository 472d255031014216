"""NIfTI export of volumes and label volumes with the geometry dcm2niix writes.

Storage order: like dcm2niix, the NIfTI array is indexed (x, y, z) = (column i, Rows-1-j, slice k): the image
rows are stored bottom-up and slices in our order (increasing along the normal). The affine is the RAS map of
that index (NIfTI world = RAS: LPS with x and y negated), written as both sform and qform with code 1
(scanner). dcm2niix additionally reorients some 3D MR acquisitions; we never reorient.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.masks import body_mask, brain_mask, lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MaskName = Literal["lung", "body", "brain"]


def nifti_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """RAS affine of the NIfTI index (x, y, z) = (i, Rows-1-j, k), as dcm2niix writes it."""
    rows = volume.shape[1]
    index_from_nifti = np.array([[0, 0, 1, 0], [0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    return np.asarray(RAS_FROM_LPS @ volume.affine @ index_from_nifti, dtype=np.float64)


def to_nifti_order(data: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """(k, j, i) array -> (i, Rows-1-j, k) NIfTI storage order (a view)."""
    return np.transpose(data, (2, 1, 0))[:, ::-1, :]


def _image(array: npt.NDArray[Any], affine: npt.NDArray[np.float64], dtype: Any) -> Any:
    stored = np.ascontiguousarray(to_nifti_order(array)).astype(dtype, copy=False)
    nifti_image: Any = nib.Nifti1Image
    image: Any = nifti_image(stored, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _data_dtype(data: npt.NDArray[np.float32]) -> type[np.generic]:
    """int16 when every value is a whole number in range (CT HU, most MR), else float32."""
    in_range = data.size > 0 and float(data.min()) >= -32768 and float(data.max()) <= 32767
    if in_range and bool(np.all(np.mod(data, 1) == 0)):
        return np.int16
    return np.float32


def nifti_image(volume: Volume) -> Any:
    """The ``nibabel.Nifti1Image`` :func:`write_nifti` saves for ``volume`` (in memory, not yet written)."""
    return _image(volume.data, nifti_affine(volume), _data_dtype(volume.data))


def write_nifti(volume: Volume, path: Path, mask: LabelVolume | None = None, mask_path: Path | None = None,
                ) -> list[Path]:
    """Write ``volume`` to ``path`` (.nii or .nii.gz) and, if given, ``mask`` (uint8 labels, same grid) to
    ``mask_path`` (default: ``<path stem>_mask.nii.gz``). Returns the paths written."""
    path = Path(path)
    affine = nifti_affine(volume)
    nib.save(nifti_image(volume), str(path))
    written = [path]
    if mask is not None:
        if mask.data.shape != volume.shape:
            raise ValueError(f"mask shape {mask.data.shape} is not the volume's {volume.shape}")
        target = Path(mask_path) if mask_path is not None else _sibling(path, "mask")
        nib.save(_image(mask.data, affine, np.uint8), str(target))
        written.append(target)
    return written


def _sibling(path: Path, suffix: str) -> Path:
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    return path.with_name(f"{stem}_{suffix}.nii.gz")


def convert_series(series_dir: Path, out: Path, mask: MaskName | None = None) -> list[Path]:
    """Load the series in ``series_dir``, write it to ``out`` and, with ``mask``, ``<stem>_<mask>.nii.gz``.

    Raises VolumeError when the folder is not one regular (or regularisable) series.
    """
    volume = load_series_dir(Path(series_dir))
    labels = None
    if mask is not None:
        makers: dict[str, Callable[[Volume], LabelVolume]] = {
            "lung": lung_mask, "body": body_mask, "brain": brain_mask}
        labels = makers[mask](volume)
    mask_path = _sibling(Path(out), mask) if mask is not None else None
    return write_nifti(volume, Path(out), labels, mask_path)
