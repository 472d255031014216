"""Preprocessing on real volumes: windows, resample + inverse (torch vs scipy), normalisation, crop/pad."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.masks import body_mask
from dicomnode.imaging.preprocess import (
    WINDOWS,
    bounding_box,
    clip_hu,
    crop,
    minmax,
    pad_to_shape,
    resample,
    resample_to,
    to_uint8,
    uncrop,
    unminmax,
    unzscore,
    window,
    window_volume,
    zscore,
)
from dicomnode.imaging.volume import Volume


def test_window_presets_and_series_window(p03: Volume) -> None:
    assert WINDOWS["brain"] == (40.0, 80.0) and {"subdural", "stroke", "bone", "lung", "mediastinum",
                                                 "soft_tissue"} <= set(WINDOWS)
    assert np.allclose(window(np.array([0.0, 40.0, 80.0, -5.0]), 40, 80), [0.0, 0.5, 1.0, 0.0])
    brain = window_volume(p03, "brain")
    assert brain.dtype == np.float32 and 0.0 <= brain.min() and brain.max() <= 1.0
    assert np.array_equal(window_volume(p03, "series"), window(p03.data, *p03.window))  # type: ignore[misc]
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="unknown window preset"):
        window_volume(p03, "liver-ish")


def test_resample_and_exact_inverse_on_real_data(p03: Volume) -> None:
    """5 mm slices -> 2.5 mm: every source slice is a target slice, so nearest labels come back exactly."""
    spacing = (2.5, p03.spacing[1] / 2, p03.spacing[2] / 2)
    fine, fine_affine = resample(p03, target_spacing=spacing, order="linear", device="cpu")
    assert fine.shape == (55, 1023, 1023)
    assert np.allclose(fine_affine @ [2, 0, 0, 1], p03.affine @ [1, 0, 0, 1])
    back = resample_to(fine, fine_affine, p03.shape, p03.affine, "linear", device="cpu")
    assert np.allclose(back, p03.data, atol=1e-3)
    labels = body_mask(p03).data
    fine_labels, _ = resample(labels, p03.affine, spacing, order="nearest", device="cpu")
    assert fine_labels.dtype == np.uint8
    assert np.array_equal(resample_to(fine_labels, fine_affine, p03.shape, p03.affine, "nearest"), labels)


def test_torch_and_scipy_agree(p03: Volume) -> None:
    data = p03.data[:, ::4, ::4]
    affine = p03.affine @ np.diag([1.0, 4.0, 4.0, 1.0])
    ours, new_affine = resample(data, affine, (1.5, 2.0, 2.5), order="linear", device="cpu")
    index_map = np.linalg.inv(affine) @ new_affine
    reference = ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3], output_shape=ours.shape,
                                         order=1, mode="nearest")
    assert np.abs(ours - reference).max() < 1e-2
    rotation = np.eye(4)
    angle = np.radians(10)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    oblique = affine @ rotation
    ours_oblique = resample_to(data, affine, data.shape, oblique, "linear", device="cpu")
    index_map = np.linalg.inv(affine) @ oblique
    reference = ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3], order=1, mode="nearest")
    inner = (slice(2, -2), slice(10, -10), slice(10, -10))
    assert np.abs(ours_oblique - reference)[inner].max() < 0.5


def test_normalisation_round_trips(p03: Volume) -> None:
    clipped = clip_hu(p03.data, -1000, 1000)
    assert clipped.min() >= -1000 and clipped.max() <= 1000
    z, stats = zscore(clipped)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert np.allclose(unzscore(z, stats), clipped, atol=1e-2)
    scaled, bounds = minmax(clipped)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.allclose(unminmax(scaled, bounds), clipped, atol=1e-2)


def test_crop_to_body_and_pad_with_inverses(p03: Volume) -> None:
    body = body_mask(p03).mask(1)
    box = bounding_box(body, margin=2)
    cut, cut_affine = crop(p03.data, p03.affine, box)
    assert cut.shape[1] < p03.shape[1] and body[box.slices].sum() == body.sum()
    assert np.allclose(cut_affine @ [0, 0, 0, 1], p03.affine @ [*box.start, 1])
    restored = uncrop(cut, box, fill=-1000)
    assert np.array_equal(restored[box.slices], p03.data[box.slices])
    padded, pad_affine, where = pad_to_shape(cut, cut_affine, (32, 512, 512), fill=-1000)
    assert padded.shape == (32, 512, 512) and np.array_equal(padded[where.slices], cut)
    assert np.allclose(pad_affine @ [*where.start, 1], cut_affine @ [0, 0, 0, 1])


def test_cpu_linear_path_matches_scipy_and_keeps_nan_local() -> None:
    """The banded-product CPU path against scipy on random data (up- and down-sampling, an offset grid), and
    NaN input handled by the gather path (NaN stays at its neighbours, no block-wide spread)."""
    rng = np.random.default_rng(1)
    data = rng.normal(0, 300, (23, 70, 90)).astype(np.float32)
    affine = np.diag([1.25, 0.7, 0.9, 1.0])
    for spacing in ((1.0, 1.0, 1.0), (2.6, 0.45, 1.7)):
        ours, new_affine = resample(data, affine, spacing, device="cpu")
        index_map = np.linalg.inv(affine) @ new_affine
        reference = ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3],
                                             output_shape=ours.shape, order=1, mode="nearest")
        assert np.abs(ours - reference).max() < 1e-2
    shifted = affine.copy()
    shifted[:3, 3] = (0.3, -2.1, 5.05)
    ours = resample_to(data, affine, (20, 60, 80), shifted, device="cpu")
    index_map = np.linalg.inv(affine) @ shifted
    reference = ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3], output_shape=(20, 60, 80),
                                         order=1, mode="nearest")
    assert np.abs(ours - reference).max() < 1e-2
    data[10, 30, 40] = np.nan
    ours, _ = resample(data, affine, (1.0, 1.0, 1.0), device="cpu")
    assert 0 < int(np.isnan(ours).sum()) <= 27


def test_cpu_linear_path_with_flipped_axes_and_heavy_upsampling() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(0, 300, (9, 40, 50)).astype(np.float32)
    affine = np.diag([3.0, 0.8, 0.8, 1.0])
    flipped = affine @ np.array([[-1.0, 0, 0, 8], [0, 1, 0, 0], [0, 0, -1, 49], [0, 0, 0, 1]])
    ours = resample_to(data, affine, data.shape, flipped, device="cpu")
    assert np.array_equal(ours, data[::-1, :, ::-1])
    fine, fine_affine = resample(data, affine, (0.25, 0.8, 0.8), device="cpu")
    index_map = np.linalg.inv(affine) @ fine_affine
    reference = ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3], output_shape=fine.shape,
                                         order=1, mode="nearest")
    assert fine.shape[0] == 97 and np.abs(fine - reference).max() < 1e-2
