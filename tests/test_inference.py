"""Inference: loaders, runner (sliding window, determinism, device, OOM fallback), the shipped lung U-Net."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LUNG_LEFT, LUNG_RIGHT
from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.inference import (
    DeviceUnavailableError,
    InferenceOutOfMemory,
    ModelLoadError,
    ModelRunner,
    PreprocessSpec,
    RunnerSettings,
    SegmenterCache,
    TorchScriptSegmenter,
    UNetSegmenter,
    resolve_device,
)
from dicomnode.inference.loaders import DEFAULT_LUNG_UNET, load_unet, save_torchscript, save_unet_checkpoint
from dicomnode.inference.spec import Orientation, prepare, restore_labels
from dicomnode.inference.unet import UNet3D, UNetConfig
from tests.conftest import series_dir

SPEC = PreprocessSpec(
    target_spacing_mm=(4.0, 4.0, 4.0),
    window_low=-1000.0,
    window_high=400.0,
    patch_size=(8, 16, 16),
    label_values=(LUNG_RIGHT.value, LUNG_LEFT.value),
    label_names=(LUNG_RIGHT.name, LUNG_LEFT.name),
)


def make_volume(shape: tuple[int, int, int] = (12, 40, 48), seed: int = 0) -> Volume:
    """A small CT volume (HU) at 4 x 2 x 2 mm: noise, a body block and two air blocks (left/right)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(40.0, 20.0, shape).astype(np.float32)
    data[:, 8:32, 6:20] = -850.0  # patient right (low x)
    data[:, 8:32, 28:42] = -850.0  # patient left (high x)
    affine = np.array([[0, 0, 2.0, -48.0], [0, 2.0, 0, -40.0], [4.0, 0, 0, -20.0], [0, 0, 0, 1.0]])
    return Volume(data, affine, "CT", "HU", "2.25.1", "2.25.2", "2.25.3", (), (), ())


class Pointwise(nn.Module):
    """A model whose receptive field is one voxel: logits depend on the voxel's own value only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 1)
        self.conv2 = nn.Conv3d(4, 3, 1)
        torch.manual_seed(0)
        for p in self.parameters():
            nn.init.normal_(p, std=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv2(torch.tanh(self.conv1(x)))
        return out


class OomAboveBatch(Pointwise):
    """Raises CUDA out-of-memory (as torch does) whenever a batch is larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(x)


def test_torchscript_model_runs_through_segmenter(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    save_torchscript(path, torch.jit.script(Pointwise().eval()), SPEC, name="tiny-ts", version="0.1")
    segmenter = TorchScriptSegmenter(path, RunnerSettings(device="cpu"))
    volume = make_volume()
    labels = segmenter.segment(volume)
    assert labels.data.shape == volume.shape and labels.data.dtype == np.uint8
    assert (labels.algorithm_name, labels.algorithm_version) == ("tiny-ts", "0.1")
    assert set(np.unique(labels.data)) <= {0, 1, 2}
    assert labels.labels == (LUNG_RIGHT, LUNG_LEFT)


def test_torchscript_without_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(Pointwise().eval()), str(path))
    with pytest.raises(ModelLoadError, match="preprocess.json"):
        TorchScriptSegmenter(path)


def test_state_dict_model_round_trips(tmp_path: Path) -> None:
    model = UNet3D(UNetConfig(channels=(2, 4)))
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    path = tmp_path / "unet.pt"
    save_unet_checkpoint(path, model.eval(), SPEC, name="tiny-unet", version="2", metrics={"dice": 0.5})
    loaded = load_unet(path)
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), model(x))
    segmenter = UNetSegmenter(path, RunnerSettings(device="cpu"))
    labels = segmenter.segment(make_volume())
    assert labels.data.shape == (12, 40, 48)
    assert segmenter.metrics == {"dice": 0.5} and segmenter.version == "2"


def test_sliding_window_equals_whole_volume() -> None:
    image = prepare(make_volume((20, 50, 60)), SPEC)  # (20, 25, 30) at 4 mm
    model = Pointwise().eval()
    whole = ModelRunner(model, (24, 32, 32), RunnerSettings(device="cpu")).predict(image)
    settings = RunnerSettings(device="cpu", batch_size=3, overlap=0.5)
    tiled = ModelRunner(model, (8, 16, 16), settings).predict(image)
    assert tiled.shape == whole.shape == (3, *image.shape)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    shape = (20, 50, 60)
    assert np.array_equal(restore_labels(tiled, shape), restore_labels(whole, shape))


def test_same_input_gives_identical_labels() -> None:
    segmenter = UNetSegmenter(settings=RunnerSettings(device="cpu", batch_size=2))
    volume = make_volume((40, 100, 100), seed=3)
    first, second = segmenter.segment(volume), segmenter.segment(volume)
    assert np.array_equal(first.data, second.data)


def test_device_settings() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError):
        resolve_device("tpu")
    image = prepare(make_volume(), SPEC)
    model = Pointwise().eval()
    on_cpu = ModelRunner(model, SPEC.patch_size, RunnerSettings(device="cpu")).predict(image)
    on_auto = ModelRunner(model, SPEC.patch_size, RunnerSettings(device="auto")).predict(image)
    torch.testing.assert_close(on_auto, on_cpu, rtol=1e-3, atol=1e-3)


def test_out_of_memory_halves_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    image = prepare(make_volume((20, 50, 60)), SPEC)
    reference = ModelRunner(Pointwise().eval(), SPEC.patch_size, RunnerSettings(device="cpu")).predict(image)
    flaky = OomAboveBatch(limit=1)
    runner = ModelRunner(flaky, SPEC.patch_size, RunnerSettings(device="cpu", batch_size=4))
    with caplog.at_level(logging.WARNING, logger="dicomnode.inference.runner"):
        result = runner.predict(image)
    torch.testing.assert_close(result, reference)
    assert flaky.calls[:3] == [4, 2, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("batch size 2" in m for m in messages) and any("batch size 1" in m for m in messages)
    # the ladder is per job: the next job starts again from the configured batch size
    flaky.calls.clear()
    torch.testing.assert_close(runner.predict(image), reference)
    assert runner.batch_size == 4 and flaky.calls[:3] == [4, 2, 1]


def test_out_of_memory_at_batch_one_on_cpu_is_retryable() -> None:
    runner = ModelRunner(OomAboveBatch(limit=0), SPEC.patch_size, RunnerSettings(device="cpu", batch_size=2))
    with pytest.raises(InferenceOutOfMemory) as info:
        runner.predict(prepare(make_volume(), SPEC))
    assert info.value.retryable


def test_cache_builds_each_segmenter_once(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    save_torchscript(path, torch.jit.script(Pointwise().eval()), SPEC, name="tiny-ts", version="0.1")
    cache = SegmenterCache(RunnerSettings(device="cpu"))
    first = cache.get("torchscript", path)
    assert cache.get("torchscript", path) is first and len(cache) == 1
    with pytest.raises(PipelineError):
        cache.get("torchscript")
    with pytest.raises(PipelineError):
        cache.get("no-such-kind")


def test_spec_json_round_trip() -> None:
    assert PreprocessSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError):
        PreprocessSpec.from_json('{"format": "other"}')


def test_orientation_round_trip() -> None:
    # array axes: 0 -> patient Left (+x), 1 -> Inferior (-z), 2 -> Posterior (+y)
    affine = np.array([[3.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    orientation = Orientation.of(affine)
    assert orientation.perm == (1, 2, 0) and orientation.flip == (True, False, False)
    assert orientation.spacing((3.0, 2.0, 1.0)) == (2.0, 1.0, 3.0)
    array = np.arange(24).reshape(2, 3, 4)
    assert orientation.apply(array).shape == (3, 4, 2)
    assert np.array_equal(orientation.undo(orientation.apply(array)), array)


@pytest.fixture(scope="module")
def p01_labels() -> tuple[Volume, np.ndarray]:
    volume = load_series_dir(series_dir("P01"))
    labels = UNetSegmenter(DEFAULT_LUNG_UNET, RunnerSettings(device="cpu")).segment(volume)
    return volume, labels.data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.slow
def test_shipped_lung_unet_matches_classical_mask_on_p01(p01_labels: tuple[Volume, np.ndarray]) -> None:
    volume, predicted = p01_labels
    reference = lung_mask(volume).data
    for info in (LUNG_RIGHT, LUNG_LEFT):
        assert _dice(predicted == info.value, reference == info.value) >= DICE_THRESHOLD, info.name


@pytest.mark.slow
def test_shipped_lung_unet_puts_lungs_on_the_correct_side(p01_labels: tuple[Volume, np.ndarray]) -> None:
    volume, predicted = p01_labels
    centre_x = {}
    for info in (LUNG_RIGHT, LUNG_LEFT):
        k, j, i = np.argwhere(predicted == info.value).mean(axis=0)
        centre_x[info.value] = float(volume.affine[0] @ np.array([k, j, i, 1.0]))  # LPS x: + is patient left
    assert centre_x[LUNG_RIGHT.value] < -40.0 < 40.0 < centre_x[LUNG_LEFT.value]


@pytest.mark.slow
def test_shipped_lung_unet_follows_the_patient_not_the_array(p01_labels: tuple[Volume, np.ndarray]) -> None:
    """The same P01 stored with its columns reversed (x axis pointing to patient right) gets the same labels."""
    volume, predicted = p01_labels
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (volume.shape[2] - 1)
    affine[:3, 2] *= -1
    mirrored = Volume(
        np.ascontiguousarray(volume.data[:, :, ::-1]), affine, "CT", "HU", "2.25.1", "2.25.2", "2.25.3", (), (), ()
    )
    labels = UNetSegmenter(DEFAULT_LUNG_UNET, RunnerSettings(device="cpu")).segment(mirrored)
    assert np.array_equal(labels.data[:, :, ::-1], predicted)


DICE_THRESHOLD = 0.92  # measured on P01: right 0.963, left 0.947 (model card)
