"""Classical masks on real CT: P01/P12 lungs (sides, volume, agreement), P02 brain, body; the vectorised
helpers against the scipy per-slice operations they replace."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging import masks
from dicomnode.imaging.labels import AIRWAYS, LUNG_LEFT, LUNG_RIGHT
from dicomnode.imaging.masks import ALGORITHM_VERSION, body_mask, brain_mask, lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir
from tests.conftest import series_dir


@pytest.fixture(scope="module")
def p01() -> Volume:
    return load_series_dir(series_dir("P01"))


def _ml(mask: np.ndarray, volume: Volume) -> float:
    return float(mask.sum()) * float(np.prod(volume.spacing)) / 1000.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def test_p01_lungs_on_the_correct_patient_sides(p01: Volume) -> None:
    labels = lung_mask(p01)
    assert labels.data.shape == p01.shape and labels.data.dtype == np.uint8
    assert labels.algorithm_name == "dicomnode-classical-lung" and labels.algorithm_version == ALGORITHM_VERSION
    assert {info.value for info in labels.labels} == {LUNG_RIGHT.value, LUNG_LEFT.value, AIRWAYS.value}
    for info, sign in ((LUNG_RIGHT, -1.0), (LUNG_LEFT, +1.0)):
        k, j, i = np.argwhere(labels.mask(info.value)).mean(axis=0)
        x_mm = (p01.affine @ np.array([k, j, i, 1.0]))[0]
        body_x = (p01.affine @ np.array([k, j, p01.shape[2] / 2, 1.0]))[0]
        assert sign * (x_mm - body_x) > 40.0  # LPS: patient left is +x
    right, left = _ml(labels.mask(1), p01), _ml(labels.mask(2), p01)
    assert 1500 < right < 4500 and 1200 < left < 4000 and 2500 < right + left < 8000
    assert 5 < _ml(labels.mask(3), p01) < 120  # trachea and main bronchi


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


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for density in (0.3, 0.55, 0.8):
        smooth = ndimage.uniform_filter(rng.random((5, 37, 42)), size=(1, 3, 3))
        out.append(smooth > np.quantile(smooth, 1.0 - density))
    blob = np.zeros((4, 30, 30), bool)
    blob[:, 0:20, 5:25] = True  # touches the border
    blob[:, 5:10, 10:15] = False  # a hole
    blob[1, 10, :] = False  # a slice cut in two
    out.append(blob)
    out.append(np.zeros((3, 8, 9), bool))
    return out


def test_in_plane_morphology_matches_scipy() -> None:
    square = np.ones((1, 3, 3), bool)
    for mask in _random_masks():
        assert np.array_equal(masks._erode(mask), ndimage.binary_erosion(mask, structure=square))
        assert np.array_equal(masks._dilate(mask), ndimage.binary_dilation(mask, structure=square))
        assert np.array_equal(masks._open(mask), ndimage.binary_opening(mask, structure=square))
        filled = np.stack([ndimage.binary_fill_holes(s) for s in mask]) if mask.size else mask
        assert np.array_equal(masks._fill_slices(mask), filled)


def test_largest_components_match_labelling() -> None:
    for mask in _random_masks():
        labelled, n = ndimage.label(mask)
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        for count in (1, 2):
            keep = [i for i in np.argsort(sizes)[::-1][:count] if sizes[i] > 0]
            assert np.array_equal(masks._largest(mask, count), np.isin(labelled, keep))


def test_paint_repeats_each_coarse_pixel_over_its_block() -> None:
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 4, (3, 6, 7)).astype(np.uint8)
    for factor in (1, 2, 3):
        shape = (5, 6 * factor - 1, 7 * factor - 2)  # the fine grid is not a whole number of blocks
        out = np.zeros(shape, np.uint8)
        masks._paint(out, coarse[:, 1:, 2:], (1, 1, 2), factor)
        expected = np.zeros(shape, np.uint8)
        up = np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)[:, : shape[1], : shape[2]]
        expected[1:4, factor:, 2 * factor:] = up[:, factor:, 2 * factor:]
        assert np.array_equal(out, expected)


def _airways_per_slice(air: np.ndarray, mids: np.ndarray, pixel_mm: float) -> np.ndarray:
    """The former slice-by-slice implementation, as the reference."""
    small = np.zeros_like(air)
    for k in range(air.shape[0]):
        labelled, n = ndimage.label(air[k])
        if n == 0 or np.isnan(mids[k]):
            continue
        index = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(np.ones(air[k].shape), labelled, index)
        centres = ndimage.center_of_mass(air[k], labelled, index)
        ok = [i for i, s, c in zip(index, sizes, centres, strict=True)
              if s <= 400.0 / pixel_mm**2 and abs(c[1] - mids[k]) * pixel_mm < 25.0]
        small[k] = np.isin(labelled, ok)
    labelled, n = ndimage.label(small)
    if n == 0:
        return small
    top = max(range(air.shape[0]), key=lambda k: (small[k].any(), k))
    return np.asarray(np.isin(labelled, np.unique(labelled[top][labelled[top] > 0])))


def test_vectorised_airways_match_the_per_slice_method() -> None:
    rng = np.random.default_rng(11)
    air = ndimage.uniform_filter(rng.random((12, 40, 60)), size=(3, 3, 3)) > 0.6
    air[:, 18:22, 28:32] = True  # a "trachea" through every slice
    mids = np.full(12, 30.0)
    mids[4] = np.nan  # a slice without body
    for pixel_mm in (1.0, 1.7, 3.0):
        assert np.array_equal(masks._airways(air, mids, pixel_mm), _airways_per_slice(air, mids, pixel_mm))
