"""`python -m dicomnode convert` as a user runs it: P01 to NIfTI with a lung mask, checked against dcm2niix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO, series_dir


def test_convert_verb_writes_volume_and_lung_mask_like_dcm2niix(tmp_path: Path) -> None:
    if shutil.which("dcm2niix") is None:
        pytest.fail("dcm2niix is required for this test (apt-get install dcm2niix)")
    out = tmp_path / "chest.nii.gz"
    done = subprocess.run([sys.executable, "-m", "dicomnode", "convert", str(series_dir("P01")), str(out),
                           "--mask", "lung"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    mask_path = tmp_path / "chest_lung.nii.gz"
    assert done.stdout.split() == [str(out), str(mask_path)]
    subprocess.run(["dcm2niix", "-z", "y", "-f", "ref", "-o", str(tmp_path), str(series_dir("P01"))],
                   check=True, capture_output=True, timeout=300)
    reference: Any = nib.load(tmp_path / "ref.nii.gz")
    image: Any = nib.load(out)
    mask: Any = nib.load(mask_path)
    assert image.shape == reference.shape == mask.shape == (512, 512, 64)
    assert np.abs(image.affine - reference.affine).max() < 0.01
    assert np.abs(image.get_qform() - reference.get_qform()).max() < 0.01
    assert np.array_equal(mask.affine, image.affine)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj))

    labels = np.asarray(mask.dataobj)
    assert mask.get_data_dtype() == np.uint8
    assert {1, 2} <= set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    # NIfTI world is RAS: +x points to the patient's right (LPS +x, the left, negated), so the right lung
    # (label 1) lies at larger x than the middle of the image and the left lung (label 2) at smaller x.
    body_x = float((image.affine @ [image.shape[0] / 2, 0, 0, 1])[0])
    right, left = (image.affine @ [*np.argwhere(labels == v).mean(axis=0), 1.0] for v in (1, 2))
    assert right[0] > body_x + 40 and left[0] < body_x - 40
    for value in (1, 2):  # each lung between 1.2 and 4.5 litres
        ml = float((labels == value).sum()) * float(np.prod(image.header.get_zooms()[:3])) / 1000.0
        assert 1200 < ml < 4500
