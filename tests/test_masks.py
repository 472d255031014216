"""Classical masks on real CT: P01/P12 lungs (sides, volume, agreement), P02 brain, body."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dicomnode.labels import AIRWAYS, LUNG_LEFT, LUNG_RIGHT
from dicomnode.masks import body_mask, brain_mask, lung_mask
from dicomnode.volume import Volume, load_series_dir
from tests.conftest import series_dir


@pytest.fixture(scope="module")
def p01() -> Volume:
    return load_series_dir(series_dir("P01"))


def _ml(mask: np.ndarray, volume: Volume) -> float:
    return float(mask.sum()) * float(np.prod(volume.spacing)) / 1000.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def test_p01_lungs_on_the_correct_patient_sides(p01: Volume) -> None:
    start = time.perf_counter()
    labels = lung_mask(p01)
    elapsed = time.perf_counter() - start
    assert labels.data.shape == p01.shape and labels.data.dtype == np.uint8
    assert labels.algorithm_name == "dicomnode-classical-lung" and labels.algorithm_version == "1.0"
    assert {info.value for info in labels.labels} == {LUNG_RIGHT.value, LUNG_LEFT.value, AIRWAYS.value}
    for info, sign in ((LUNG_RIGHT, -1.0), (LUNG_LEFT, +1.0)):
        k, j, i = np.argwhere(labels.mask(info.value)).mean(axis=0)
        x_mm = (p01.affine @ np.array([k, j, i, 1.0]))[0]
        body_x = (p01.affine @ np.array([k, j, p01.shape[2] / 2, 1.0]))[0]
        assert sign * (x_mm - body_x) > 40.0  # LPS: patient left is +x
    right, left = _ml(labels.mask(1), p01), _ml(labels.mask(2), p01)
    assert 1500 < right < 4500 and 1200 < left < 4000 and 2500 < right + left < 8000
    assert 5 < _ml(labels.mask(3), p01) < 120  # trachea and main bronchi
    assert elapsed < 10.0  # about 2 s on one shared core


def test_p01_and_p12_lung_masks_agree(p01: Volume) -> None:
    a = lung_mask(p01).data
    b = lung_mask(load_series_dir(series_dir("P12"))).data
    for value in (LUNG_RIGHT.value, LUNG_LEFT.value):
        assert _dice(a == value, b == value) > 0.95


def test_body_contains_lungs_and_excludes_outside_air(p01: Volume) -> None:
    body = body_mask(p01).mask(1)
    lungs = lung_mask(p01).data > 0
    assert (lungs & ~body).sum() < 0.01 * lungs.sum()
    assert not body[:, :5, :].any() and not body[:, :40, :40].any()  # anterior air and the corners
    assert float(np.median(p01.data[body])) > -200


def test_brain_mask_on_head_ct() -> None:
    volume = load_series_dir(series_dir("P02"))
    brain = brain_mask(volume)
    assert brain.algorithm_name == "dicomnode-classical-brain"
    ml = _ml(brain.mask(1), volume)
    assert 900 < ml < 1900
    inside = volume.data[brain.mask(1)]
    assert 15 < float(np.median(inside)) < 60  # grey/white matter HU
