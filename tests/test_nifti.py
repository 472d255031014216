"""NIfTI export against dcm2niix on real series, and the convert entry point with a lung mask."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from dicomnode.imaging.nifti import convert_series, write_nifti
from dicomnode.imaging.volume import load_series_dir
from tests.conftest import series_dir


@pytest.mark.parametrize("series", ["P01", "P03"])
def test_written_nifti_matches_dcm2niix(series: str, tmp_path: Path) -> None:
    subprocess.run(["dcm2niix", "-z", "y", "-f", "ref", "-o", str(tmp_path), str(series_dir(series))],
                   check=True, capture_output=True)
    reference: Any = nib.load(tmp_path / "ref.nii.gz")
    (path,) = write_nifti(load_series_dir(series_dir(series)), tmp_path / "ours.nii.gz")
    ours: Any = nib.load(path)
    assert ours.shape == reference.shape
    assert np.abs(ours.affine - reference.affine).max() < 0.01
    assert np.abs(ours.get_qform() - reference.get_qform()).max() < 0.01
    assert np.array_equal(ours.get_fdata(), reference.get_fdata())


def test_convert_with_lung_mask(tmp_path: Path) -> None:
    paths = convert_series(series_dir("P01"), tmp_path / "chest.nii.gz", mask="lung")
    assert [p.name for p in paths] == ["chest.nii.gz", "chest_lung.nii.gz"]
    image: Any = nib.load(paths[0])
    mask: Any = nib.load(paths[1])
    assert mask.get_data_dtype() == np.uint8 and mask.shape == image.shape
    assert np.array_equal(mask.affine, image.affine)
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    # label 1 (right lung) lies towards patient right, which is +x in RAS (NIfTI), -x in LPS
    centres = [mask.affine @ [*np.argwhere(labels == v).mean(axis=0), 1.0] for v in (1, 2)]
    assert centres[0][0] > centres[1][0] + 50
