"""The declarative preprocessing chain (``model.preprocess``): each step against a plain numpy/scipy reference,
each inverse round trip, the start-up checks, and the shipped lung U-Net's spec as one such chain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from dicomnode.config import (
    CropStep,
    HuStep,
    ModelConfig,
    NormalizeStep,
    PadStep,
    ResampleStep,
    SegmenterKind,
    WindowStep,
    parse_config,
)
from dicomnode.errors import ConfigError, PipelineError
from dicomnode.imaging.chain import ChainError, check_chain, run_chain, undo_chain
from dicomnode.imaging.masks import body_mask
from dicomnode.imaging.volume import Volume
from dicomnode.inference.loaders import save_torchscript
from dicomnode.inference.segmenter import build_segmenter
from dicomnode.inference.spec import prepare_array
from tests.test_inference import SPEC, Pointwise, make_volume


def _one_hot(labels: np.ndarray, classes: int) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(labels.astype(np.int64)), classes).permute(3, 0, 1, 2).float()


def _geometric(labels: np.ndarray, steps: tuple[Any, ...], spacing: tuple[float, float, float], classes: int,
               body: np.ndarray | None) -> torch.Tensor:
    """The one-hot labels pushed through the chain's geometric steps, channel by channel: 'probabilities' on
    the network grid that a perfect model would give."""
    geometric = tuple(s for s in steps if isinstance(s, (CropStep, ResampleStep, PadStep)))
    channels = [run_chain(_one_hot(labels, classes)[c].numpy(), spacing, geometric, units="HU", body=body).image
                for c in range(classes)]
    return torch.stack(channels)


def test_intensity_steps_equal_plain_numpy(p03: Volume) -> None:
    data, spacing = p03.data, p03.spacing
    out = run_chain(data, spacing, (HuStep(min=-1000, max=2000),), units="HU").image.numpy()
    assert np.array_equal(out, np.clip(data, -1000, 2000))
    out = run_chain(data, spacing, (WindowStep(center=40, width=80),), units="HU").image.numpy()
    assert np.allclose(out, np.clip((data - 0.0) / 80.0, 0, 1), atol=1e-6)
    out = run_chain(data, spacing, (WindowStep(preset="lung"),), units="HU").image.numpy()
    assert np.allclose(out, np.clip((data + 1350.0) / 1500.0, 0, 1), atol=1e-6)
    out = run_chain(data, spacing, (NormalizeStep(mode="zscore"),), units="HU").image.numpy()
    assert np.allclose(out, (data - data.mean()) / data.std(), atol=1e-4)
    inside = (data >= -500) & (data <= 500)
    out = run_chain(data, spacing, (NormalizeStep(mode="zscore", low=-500, high=500),), units="HU").image.numpy()
    assert np.allclose(out, (data - data[inside].mean()) / data[inside].std(), atol=1e-4)
    out = run_chain(data, spacing, (NormalizeStep(mode="minmax"),), units="HU").image.numpy()
    assert np.allclose(out, (data - data.min()) / (data.max() - data.min()), atol=1e-6)
    with pytest.raises(ChainError, match="Hounsfield"):
        run_chain(data, spacing, (HuStep(),), units="MR signal")


def test_resample_equals_scipy_and_its_inverse_is_exact_on_coinciding_voxels(p03: Volume) -> None:
    data, spacing = p03.data[:, ::4, ::4], (5.0, p03.spacing[1] * 4, p03.spacing[2] * 4)
    target = (2.5, spacing[1] / 2, spacing[2] / 2)
    prepared = run_chain(data, spacing, (ResampleStep(spacing=target),), units="HU")
    assert prepared.spacing == pytest.approx(target)
    grid = np.indices(prepared.image.shape, dtype=np.float64) * 0.5  # target index -> source index
    reference = ndimage.map_coordinates(data.astype(np.float64), grid, order=1, mode="nearest")
    assert np.allclose(prepared.image.numpy(), reference, atol=1e-2)
    labels = np.asarray(body_mask(p03).data[:, ::4, ::4])
    probs = _geometric(labels, (ResampleStep(spacing=target),), spacing, 2, None)
    assert np.array_equal(undo_chain(prepared, probs, data.shape), labels)


def test_extent_resampling_is_the_lung_unets_convention() -> None:
    volume = make_volume((20, 50, 60))
    data = volume.data
    image = prepare_array(data, (4.0, 2.0, 2.0), SPEC)
    t = (torch.from_numpy(data).clamp(-1000, 400) + 1000) / 1400  # the spec's clip-minmax, then trilinear
    reference = F.interpolate(t[None, None], size=(20, 25, 30), mode="trilinear", align_corners=False)[0, 0]
    assert torch.equal(image, reference)
    assert SPEC.steps == (WindowStep(center=-300.0, width=1400.0), ResampleStep(spacing=(4.0, 4.0, 4.0),
                                                                                 grid="extent"))


def test_crop_and_pad_and_the_whole_chain_round_trip(p03: Volume) -> None:
    data, spacing = p03.data[:, ::2, ::2], (5.0, p03.spacing[1] * 2, p03.spacing[2] * 2)
    body = np.asarray(body_mask(p03).data[:, ::2, ::2] > 0)
    labels = np.where(body & (data > 0), 2, np.where(body, 1, 0)).astype(np.uint8)
    steps = (HuStep(), WindowStep(center=40, width=400), CropStep(margin=3),
             ResampleStep(spacing=(2.5, spacing[1] / 2, spacing[2] / 2)), NormalizeStep(mode="zscore"),
             PadStep(multiple=16))
    prepared = run_chain(data, spacing, steps, units="HU", body=body)
    where = np.argwhere(body)
    lo, hi = np.maximum(where.min(0) - 3, 0), np.minimum(where.max(0) + 4, data.shape)
    cropped = [h - low for low, h in zip(lo, hi, strict=True)]
    assert [s % 16 for s in prepared.image.shape] == [0, 0, 0]
    assert all(s >= 2 * c - 1 for s, c in zip(prepared.image.shape, cropped, strict=True))
    probs = _geometric(labels, steps, spacing, 3, body)
    assert probs.shape[1:] == prepared.image.shape
    assert np.array_equal(undo_chain(prepared, probs, data.shape), labels)
    # padding alone: cut off exactly; the pad value is where the input is not
    padded = run_chain(data, spacing, (PadStep(shape=(40, 300, 300), value=-7.0),), units="HU")
    assert tuple(padded.image.shape) == (40, 300, 300) and float(padded.image[0, 0, 0]) == -7.0
    box = padded.undo[0].box
    assert box is not None and np.array_equal(padded.image.numpy()[box.slices], data)


def test_chain_is_typed_and_checked_at_start_up(tmp_path: Path) -> None:
    def model(steps: Sequence[object], kind: str = "lung-unet") -> ModelConfig:
        raw = {"pipelines": [{"name": "p", "kind": "segment", "model": {"kind": kind, "preprocess": steps}}]}
        return parse_config(raw).pipelines[0].model

    assert model([{"resample": {"spacing": 2}}]).preprocess == (ResampleStep(spacing=(2.0,)),)
    for steps, message in (([{"window": {"width": 10}}], "give center and width, or a preset"),
                           ([{"pad": {"multiple": 0}}], "multiple >= 1"),
                           ([{"resample": {}}, {"crop": {}}], "crop must come before resample and pad"),
                           ([{"normalize": {"mode": "median"}}], "'median' is not one of")):
        with pytest.raises(ConfigError, match=message):
            model(steps)
    with pytest.raises(ConfigError, match="only for kinds lung-unet, unet, torchscript"):
        model([{"hu": {}}], kind="lung")
    with pytest.raises(ChainError, match="crop must come before"):
        check_chain((PadStep(), CropStep()))


def test_a_torchscript_model_runs_with_the_configured_chain(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_torchscript(path, torch.jit.script(Pointwise()), SPEC, name="pointwise", version="1")
    volume = make_volume()
    default = build_segmenter(ModelConfig(kind=SegmenterKind.TORCHSCRIPT, path=path)).segment(volume)
    chain = (HuStep(), WindowStep(preset="lung"), ResampleStep(spacing=(4.0,)), NormalizeStep(), PadStep(multiple=8))
    configured = build_segmenter(ModelConfig(kind=SegmenterKind.TORCHSCRIPT, path=path, preprocess=chain))
    labels = configured.segment(volume)
    assert labels.data.shape == volume.shape and not np.array_equal(labels.data, default.data)
    mr = Volume(volume.data, volume.affine, "CT", "MR signal", "2.25.1", "2.25.2", "2.25.3", (), (), ())
    with pytest.raises(PipelineError, match="Hounsfield"):
        configured.segment(mr)
