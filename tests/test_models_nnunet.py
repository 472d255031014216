"""nnU-Net v2 models: the node's labels equal, voxel for voxel, what nnunetv2's own ``nnUNetv2_predict`` writes for
the NIfTI of the same series (made by ``dicomnode convert``), mapped back to the DICOM grid.

The model is a tiny PlainConvUNet with random weights in nnU-Net's own folder and checkpoint format
(scripts/tiny_models.py), with weights that make the labels depend on the image (several classes, no symmetry),
so a flipped or transposed input would show. This is the test of axis order, spacing and orientation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.inference.nnunet import NnUNetSegmenter, available_folds, nnunet_input
from dicomnode.inference.segmenter import build_segmenter
from scripts.tiny_models import NnUNetArch, nnunet_cascade, nnunet_model_folder
from tests.conftest import series_dir
from tests.model_checks import BIN, convert, nifti_labels, seg_round_trip

pytestmark = pytest.mark.slow
LABELS = {"liver": 1, "spleen": 2, "widget": 3}
ARCH = NnUNetArch(patch=(32, 32, 32), spacing=(5.0, 8.0, 8.0))


class Case:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "results"
        self.folder = nnunet_model_folder(self.results / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                          LABELS, arch=ARCH, seed=1)
        self.volume = load_series_dir(series_dir("P03"))
        (root / "in").mkdir()
        convert(series_dir("P03"), root / "in" / "case_0000.nii.gz")

    def framework(self, *, mirroring: bool) -> npt.NDArray[np.uint8]:
        """nnUNetv2_predict on the converted NIfTI (dataset 999, fold 0, CPU), back on the DICOM grid."""
        out = self.root / f"out-{mirroring}"
        env = dict(os.environ, nnUNet_results=str(self.results), nnUNet_raw=str(self.root),
                   nnUNet_preprocessed=str(self.root))
        cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(self.root / "in"), "-o", str(out), "-d", "999",
               "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
        run = subprocess.run(cmd + ([] if mirroring else ["--disable_tta"]), env=env, capture_output=True,
                             text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return nifti_labels(out / "case.nii.gz", self.volume)

    def node(self, **keys: object) -> LabelVolume:
        model = ModelConfig(kind=SegmenterKind.NNUNET, path=self.results / "Dataset999_Tiny", **keys)  # type: ignore[arg-type]
        segmenter = build_segmenter(model)
        return segmenter.segment(self.volume)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("nnunet"))


def test_node_equals_nnunetv2_predict_voxel_for_voxel(case: Case, tmp_path: Path) -> None:
    node = case.node(mirroring=False)
    judge = case.framework(mirroring=False)
    assert node.data.shape == case.volume.shape
    counts = np.bincount(judge.ravel(), minlength=4)
    assert (counts > 10_000).sum() >= 3, counts  # the image decides the class: a wrong axis would show
    assert int((judge != judge[:, ::-1, :]).sum()) > 100_000  # and it is not symmetric in the rows
    assert np.array_equal(node.data, judge), int((node.data != judge).sum())
    assert node.algorithm_name == "Dataset999_Tiny" and node.algorithm_version == "1.0-test"
    assert {i.value: i.name for i in node.labels} == {1: "liver", 2: "spleen", 3: "widget"}
    seg = seg_round_trip(case.volume, node, tmp_path)
    codes = {str(s.SegmentLabel): str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence}
    assert codes == {"liver": "10200004", "spleen": "78961009", "widget": "85756007"}
    widget = [s for s in seg.SegmentSequence if s.SegmentLabel == "widget"][0]
    assert "no SNOMED CT code" in widget.SegmentDescription


def test_test_time_mirroring_is_wired_and_equals_the_framework(case: Case) -> None:
    mirrored = case.node(mirroring=True)
    assert np.array_equal(mirrored.data, case.framework(mirroring=True))
    assert not np.array_equal(mirrored.data, case.node(mirroring=False).data)


def test_input_is_the_nifti_readers_array_and_the_inverse_is_exact(case: Case) -> None:
    volume: Volume = case.volume
    for reorient in (False, True):
        given = nnunet_input(volume, reorient)
        assert given.image.shape[0] == 1 and given.image.dtype == np.float32
        back = given.undo(given.image[0])
        assert np.array_equal(back, volume.data)
    plain = nnunet_input(volume, False)
    assert np.array_equal(plain.image[0], volume.data[:, ::-1, :])  # SimpleITK order: rows reversed
    assert plain.properties["spacing"] == pytest.approx(list(volume.spacing))


def test_folds_checkpoint_and_configuration_are_checked(case: Case, tmp_path: Path) -> None:
    assert available_folds(case.folder, "checkpoint_final.pth") == ("0",)
    with pytest.raises(PipelineError, match=r"no checkpoint_best.pth for fold\(s\) any"):
        case.node(checkpoint="checkpoint_best.pth")
    with pytest.raises(PipelineError, match=r"fold\(s\) 3"):
        case.node(folds=("0", "3"))
    with pytest.raises(PipelineError, match="configuration 2d; found: none"):
        case.node(configuration="2d")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="no single nnU-Net model folder"):
        NnUNetSegmenter(ModelConfig(kind=SegmenterKind.NNUNET, path=empty), torch.device("cpu"))


def _nnunetv2_predict(root: Path, results: Path, dataset: str, configuration: str, out: Path,
                      *extra: str) -> None:
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(root), nnUNet_preprocessed=str(root))
    cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(root / "in"), "-o", str(out), "-d", dataset,
           "-c", configuration, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_a_cascade_equals_nnunetv2_predict_with_the_previous_stage(case: Case, tmp_path: Path) -> None:
    """``configuration: 3d_cascade_fullres``: the node runs the 3d_lowres model first and gives its labels to
    the full-resolution stage in memory; nnUNetv2_predict does the same through ``-prev_stage_predictions``."""
    results = tmp_path / "results"
    dataset = results / "Dataset998_TinyCascade"
    nnunet_cascade(dataset, LABELS, low=NnUNetArch(patch=(16, 32, 32), spacing=(10.0, 16.0, 16.0)), full=ARCH,
                   seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case_0000.nii.gz").symlink_to(case.root / "in" / "case_0000.nii.gz")
    _nnunetv2_predict(tmp_path, results, "998", "3d_lowres", tmp_path / "low")
    _nnunetv2_predict(tmp_path, results, "998", "3d_cascade_fullres", tmp_path / "out",
                      "-prev_stage_predictions", str(tmp_path / "low"))
    judge = nifti_labels(tmp_path / "out" / "case.nii.gz", case.volume)
    low = nifti_labels(tmp_path / "low" / "case.nii.gz", case.volume)
    assert (np.bincount(judge.ravel(), minlength=4) > 10_000).sum() >= 2
    assert int((judge != low).sum()) > 10_000  # the second stage is a model of its own

    model = ModelConfig(kind=SegmenterKind.NNUNET, path=dataset, configuration="3d_cascade_fullres", mirroring=False)
    segmenter = build_segmenter(model)
    assert isinstance(segmenter, NnUNetSegmenter) and segmenter.previous is not None
    labels = segmenter.segment(case.volume)
    assert np.array_equal(labels.data, judge), int((labels.data != judge).sum())

    shutil.rmtree(dataset / "nnUNetTrainer__nnUNetPlans__3d_lowres")
    with pytest.raises(PipelineError, match="a cascade stage needs the 3d_lowres model it follows"):
        build_segmenter(model)
