"""Every segmenter kind the node ships, through the worker's data path (volume -> segmenter -> SEG, SR and
Secondary Captures -> read-back) on a real series it is meant for, each object read back independently here.

The lung U-Net, the lung, the body and the brain masks need no weights; ``unet`` and ``torchscript`` run tiny
models saved by the test. A new kind in :class:`~dicomnode.config.SegmenterKind` without a case here fails
``test_every_kind_has_a_case``.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from torch import nn

from dicomnode.config import PipelineConfig, SegmenterKind, parse_config
from dicomnode.imaging.labels import LUNG_LEFT, LUNG_RIGHT
from dicomnode.imaging.volume import load_series_dir
from dicomnode.inference import PreprocessSpec
from dicomnode.inference.loaders import save_torchscript, save_unet_checkpoint
from dicomnode.inference.unet import UNet3D, UNetConfig
from dicomnode.outputs.validate import SEG_CLASS, SR_3D_CLASS
from dicomnode.work.segment import Segmenters, make_outputs
from tests.conftest import series_dir

# kind -> shared series it is run on: chest CT for the lung models, the head CT for body and brain
CASES = {
    SegmenterKind.LUNG: "P01",
    SegmenterKind.LUNG_UNET: "P01",
    SegmenterKind.UNET: "P01",
    SegmenterKind.TORCHSCRIPT: "P01",
    SegmenterKind.BODY: "P03",
    SegmenterKind.BRAIN: "P03",
}

SPEC = PreprocessSpec(target_spacing_mm=(5.0, 5.0, 5.0), window_low=-1000.0, window_high=400.0,
                      patch_size=(16, 32, 32), label_values=(LUNG_RIGHT.value, LUNG_LEFT.value),
                      label_names=(LUNG_RIGHT.name, LUNG_LEFT.name))


class Thresholds(nn.Module):
    """Three classes from the normalised intensity alone: air -> class 1, dense tissue -> class 2, else 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, -40.0, 40.0]).view(3, 1, 1, 1, 1))
            bias = self.conv.bias
            assert bias is not None
            bias.copy_(torch.tensor([0.0, 12.0, -30.0]))  # class 1 below x=0.3, class 2 above 0.75

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


def _model_path(kind: SegmenterKind, folder: Path) -> Path | None:
    if kind is SegmenterKind.TORCHSCRIPT:
        path = folder / "tiny.ts.pt"
        save_torchscript(path, torch.jit.script(Thresholds().eval()), SPEC, name="tiny-ts", version="0.1")
        return path
    if kind is SegmenterKind.UNET:
        model = UNet3D(UNetConfig(channels=(2, 4)))
        torch.manual_seed(3)
        for p in model.parameters():
            nn.init.normal_(p, std=0.5)
        path = folder / "tiny.unet.pt"
        save_unet_checkpoint(path, model.eval(), SPEC, name="tiny-unet", version="0.2")
        return path
    return None


def _pipeline(kind: SegmenterKind, path: Path | None, storage: Path) -> PipelineConfig:
    model: dict[str, object] = {"kind": kind.value, "batch_size": 4}
    if path is not None:
        model["path"] = str(path)
    cfg = parse_config({"storage": {"path": str(storage)}, "worker": {"device": "cpu"},
                        "pipelines": [{"name": f"all-{kind.value}", "kind": "segment", "model": model,
                                       "outputs": {"kinds": ["seg", "sr", "sc"], "overlay_max": 3}}]})
    return cfg.pipelines[0]


def _read(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


def _check_seg(data: bytes, source_uids: set[str], n_slices: int) -> dict[int, int]:
    """SEG read back by highdicom: segment numbers 1..N, each with frames that reference source slices; returns
    the number of voxels per segment."""
    seg = hd.seg.segread(BytesIO(data))
    numbers = list(seg.get_segment_numbers())
    assert numbers == list(range(1, len(numbers) + 1)) and numbers
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced <= source_uids
    counts = {}
    for number in numbers:
        pixels = seg.get_pixels_by_source_instance(sorted(referenced), segment_numbers=[number])
        assert pixels.shape[0] <= n_slices
        counts[number] = int(np.count_nonzero(pixels))
        assert counts[number] > 0, f"segment {number} is empty"
    return counts


# The framework kinds need a model folder built by their own framework: their SEG read-back lives with the
# fixtures that build them.
ELSEWHERE = {SegmenterKind.NNUNET: "test_models_nnunet.py", SegmenterKind.MONAI_BUNDLE: "test_models_monai.py",
             SegmenterKind.TOTALSEGMENTATOR: "test_models_totalsegmentator.py"}


def test_every_kind_has_a_case() -> None:
    assert set(CASES) | set(ELSEWHERE) == set(SegmenterKind) and not set(CASES) & set(ELSEWHERE)
    for name in ELSEWHERE.values():
        text = (Path(__file__).parent / name).read_text()
        assert "SegmentSequence" in text or "Segmentation" in text, f"{name} reads no SEG back"


@pytest.mark.parametrize("kind", list(CASES), ids=[k.value for k in CASES])
def test_kind_encodes_seg_sr_and_sc_that_read_back(kind: SegmenterKind, tmp_path: Path) -> None:
    folder = series_dir(CASES[kind])
    files = sorted(p for p in folder.iterdir() if p.is_file())
    pipe = _pipeline(kind, _model_path(kind, tmp_path), tmp_path / "data")
    segmenters = Segmenters(parse_config({"worker": {"device": "cpu"}}))

    outputs, _, _ = make_outputs(files, pipe, segmenters)

    volume = load_series_dir(folder)
    labels = segmenters.for_pipeline(pipe).get(pipe.model.kind, pipe.model.path).segment(volume)
    present = sorted(i.value for i in labels.labels if np.any(labels.data == i.value))
    by_class: dict[str, list[bytes]] = {}
    for ds, data in outputs:
        back = _read(data)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.StudyInstanceUID == volume.study_instance_uid
        by_class.setdefault(str(back.SOPClassUID), []).append(data)
    (seg_bytes,) = by_class.pop(SEG_CLASS)
    counts = _check_seg(seg_bytes, {s.sop_instance_uid for s in volume.slices}, volume.shape[0])
    assert list(counts.values()) == [int(np.count_nonzero(labels.data == v)) for v in present]
    (sr_bytes,) = by_class.pop(SR_3D_CLASS)
    sr = hd.sr.srread(BytesIO(sr_bytes))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report: Any = sr.content  # a MeasurementReport (TID 1500) read back
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(present)
    pictures = by_class.pop(pydicom.uid.SecondaryCaptureImageStorage)
    assert len(pictures) >= 3  # overlays, the three-plane view, the 3D surface view
    for data in pictures:
        sc = _read(data)
        assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert by_class == {}
