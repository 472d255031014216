"""MONAI bundles: the node's labels equal, voxel for voxel, those of running the bundle with MONAI itself
(``python -m monai.bundle run``) on the NIfTI of the same series (made by ``dicomnode convert``), mapped back to
the DICOM grid. The bundle is made by ``monai.bundle.init_bundle`` with a small UNet and random weights
(scripts/tiny_models.py), a model-zoo style inference.json (RAS, Spacing, intensity window, Gaussian sliding
window, Invertd) and metadata naming its channels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.volume import Volume
from dicomnode.inference.monai_bundle import MonaiBundleSegmenter
from dicomnode.inference.segmenter import build_segmenter
from scripts.tiny_models import monai_bundle
from tests.conftest import series_dir
from tests.model_checks import convert, nifti_labels, seg_round_trip

pytestmark = pytest.mark.slow
CHANNELS = {1: "liver", 2: "spleen", 3: "kidney_left"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return monai_bundle(tmp_path_factory.mktemp("monai") / "bundle", CHANNELS)


def test_node_equals_monai_bundle_run_voxel_for_voxel(bundle: Path, p03: Volume, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    convert(series_dir("P03"), tmp_path / "in" / "case.nii.gz")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
           "--dataset_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    judge = nifti_labels(tmp_path / "out" / "case_seg.nii.gz", p03)
    counts = np.bincount(judge.ravel(), minlength=4)
    assert (counts > 100_000).all(), counts  # every channel wins somewhere: the image decides
    assert int((judge != judge[:, :, ::-1]).sum()) > 100_000  # not symmetric left-right

    labels = build_segmenter(ModelConfig(kind=SegmenterKind.MONAI_BUNDLE, path=bundle)).segment(p03)
    assert np.array_equal(labels.data, judge), int((labels.data != judge).sum())
    assert (labels.algorithm_name, labels.algorithm_version) == ("Tiny CT bundle", "0.1.0")
    seg = seg_round_trip(p03, labels, tmp_path)
    kidney = [s for s in seg.SegmentSequence if s.SegmentLabel == "kidney_left"][0]
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"  # Kidney, from TotalSegmentator's
    modifier = kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeMeaning == "Left"


def test_the_network_stays_resident_and_a_torchscript_bundle_gives_the_same(bundle: Path, p03: Volume,
                                                                          tmp_path: Path) -> None:
    segmenter = MonaiBundleSegmenter(ModelConfig(kind=SegmenterKind.MONAI_BUNDLE, path=bundle), torch.device("cpu"))
    network = segmenter.network
    first = segmenter.segment(p03).data
    assert segmenter.network is network and np.array_equal(segmenter.segment(p03).data, first)
    scripted = tmp_path / "scripted"
    shutil.copytree(bundle, scripted)
    torch.jit.script(network).save(str(scripted / "models" / "model.ts"))
    (scripted / "models" / "model.pt").unlink()
    again = MonaiBundleSegmenter(ModelConfig(kind=SegmenterKind.MONAI_BUNDLE, path=scripted), torch.device("cpu"))
    assert np.array_equal(again.segment(p03).data, first)


def test_broken_bundles_fail_at_start_up_with_the_reason(bundle: Path, tmp_path: Path) -> None:
    def build(path: Path) -> None:
        MonaiBundleSegmenter(ModelConfig(kind=SegmenterKind.MONAI_BUNDLE, path=path), torch.device("cpu"))

    with pytest.raises(PipelineError, match="not a MONAI bundle"):
        build(tmp_path)
    broken = tmp_path / "no-channels"
    shutil.copytree(bundle, broken)
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="names no output channels"):
        build(broken)
    (broken / "configs" / "metadata.json").write_text((bundle / "configs" / "metadata.json").read_text())
    (broken / "models" / "model.pt").unlink()
    with pytest.raises(PipelineError, match="no models/model.pt or models/model.ts"):
        build(broken)
