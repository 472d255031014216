"""TotalSegmentator: the node's labels (models resident) equal, voxel for voxel, what TotalSegmentator's own Python
API writes for the NIfTI of the same series, with tiny random models placed in a weights folder under the
dataset names TotalSegmentator looks for (its ``fast`` total task: Dataset297, 117 classes; and the full
``total`` task: five part models, Dataset291-295, combined by its part maps). And the start-up
error, naming the folders looked for, when the weights are missing.

The judge runs in a subprocess with TotalSegmentator's environment (TOTALSEG_HOME_DIR with usage statistics
off, TOTALSEG_WEIGHTS_PATH). One workaround, the same as the node's: the models' trainer
(nnUNetTrainer_4000epochs_NoMirroring for fast, nnUNetTrainerNoMirroring for the parts) is registered in
TotalSegmentator's own ``custom_trainers`` table, because
nnU-Net's trainer search would otherwise import its Primus trainers, hence timm and the registry's torchvision,
which cannot load next to the CPU torch here. The trainer only builds the network from the plans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from totalsegmentator.map_to_binary import class_map

from dicomnode.config import ModelConfig, SegmenterKind
from dicomnode.errors import PipelineError
from dicomnode.imaging.volume import Volume
from dicomnode.inference.segmenter import build_segmenter
from dicomnode.inference.totalseg import TotalSegmentatorSegmenter
from scripts.tiny_models import totalsegmentator_weights
from tests.conftest import series_dir
from tests.model_checks import convert, nifti_labels, seg_round_trip

pytestmark = pytest.mark.slow
# nnU-Net's own trainer variants the tiny models name (TotalSegmentator registers its custom ones itself)
TRAINERS = (("nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
             "nnUNetTrainer_4000epochs_NoMirroring"),
            ("nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring",
             "nnUNetTrainerNoMirroring"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("totalseg") / "weights"
    totalsegmentator_weights(folder, "total", fast=True)
    return folder


def _api(nifti: Path, out: Path, weights: Path, home: Path, *, task: str = "total", fast: bool = True) -> None:
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_test", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), TOTALSEG_WEIGHTS_PATH=str(weights),
               nnUNet_results=str(weights), nnUNet_raw=str(weights), nnUNet_preprocessed=str(weights))
    register = "".join(f"from {module} import {name}; tsn.custom_trainers[{name!r}] = {name}; "
                       for module, name in TRAINERS)
    code = ("import totalsegmentator.nnunet as tsn; " + register +
            "from totalsegmentator.python_api import totalsegmentator; "
            f"totalsegmentator({str(nifti)!r}, {str(out)!r}, task={task!r}, fast={fast}, ml=True, device='cpu', "
            "quiet=True)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_node_equals_totalsegmentator_api_voxel_for_voxel(weights: Path, p03: Volume, tmp_path: Path) -> None:
    convert(series_dir("P03"), tmp_path / "ct.nii.gz")
    _api(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", weights, tmp_path / "home")
    judge = nifti_labels(tmp_path / "seg.nii.gz", p03)
    assert np.unique(judge).size > 20  # the image decides the class
    assert int((judge != judge[:, :, ::-1]).sum()) > 100_000

    model = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="total", fast=True, weights=weights)
    segmenter = build_segmenter(model)
    assert isinstance(segmenter, TotalSegmentatorSegmenter)
    predictor = segmenter.models[297][0]
    labels = segmenter.segment(p03)
    assert np.array_equal(labels.data, judge), int((labels.data != judge).sum())
    assert np.array_equal(segmenter.segment(p03).data, judge) and segmenter.models[297][0] is predictor
    assert labels.algorithm_name == "TotalSegmentator total fast" and labels.algorithm_version.endswith("/297")
    names = {i.value: i.name for i in labels.labels}
    assert len(names) == 117 and names[5] == "liver"
    seg = seg_round_trip(p03, labels, tmp_path)
    liver = [s for s in seg.SegmentSequence if s.SegmentLabel == "liver"][0]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    coded = [s for s in seg.SegmentSequence if "no SNOMED CT code" in str(s.get("SegmentDescription", ""))]
    assert len(coded) < 5, [s.SegmentLabel for s in coded]  # TotalSegmentator's own mapping codes nearly all


def test_the_five_part_total_task_equals_totalsegmentator_api(p03: Volume, tmp_path: Path) -> None:
    """``total`` without ``fast``: five part models (Dataset291-295) at 1.5 mm, each part's labels mapped to
    the task's by TotalSegmentator's part maps and combined, all five resident."""
    weights = tmp_path / "weights"
    totalsegmentator_weights(weights, "total", fast=False)
    convert(series_dir("P03"), tmp_path / "ct.nii.gz")
    _api(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", weights, tmp_path / "home", fast=False)
    judge = nifti_labels(tmp_path / "seg.nii.gz", p03)
    model = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="total", fast=False, weights=weights)
    segmenter = build_segmenter(model)
    assert isinstance(segmenter, TotalSegmentatorSegmenter) and sorted(segmenter.models) == [291, 292, 293, 294, 295]
    labels = segmenter.segment(p03)
    assert np.array_equal(labels.data, judge), int((labels.data != judge).sum())
    found = set(np.unique(judge).tolist()) - {0}
    parts = {tid: set(lut[lut > 0].tolist()) for tid, lut in segmenter.part_luts.items()}
    assert sum(1 for classes in parts.values() if classes & found) >= 3, "labels from several part models"
    assert labels.algorithm_name == "TotalSegmentator total"
    assert labels.algorithm_version.endswith("/291+292+293+294+295")


def test_a_task_cropped_to_organs_equals_totalsegmentator_api(p03: Volume, tmp_path: Path) -> None:
    """``lung_vessels``: the rough total model the API picks for it (the robust 3 mm one, Dataset297: the task
    sets ``robust_crop``) finds the lungs, the image is cropped to them with the API's margin, the task's model
    (SkeletonRecall trainer, 0.7 x 0.7 x 1 mm) runs on the crop and the
    crop is undone; all resident. The tiny crop model's seed is one whose 'lungs' are a thin slab of P03, so
    the crop is much smaller than the image and a misplaced crop would show."""
    weights = tmp_path / "weights"
    totalsegmentator_weights(weights, "total", fast=True, seed=5)
    totalsegmentator_weights(weights, "lung_vessels", fast=False, seed=1)
    convert(series_dir("P03"), tmp_path / "ct.nii.gz")
    _api(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", weights, tmp_path / "home", task="lung_vessels",
         fast=False)
    judge = nifti_labels(tmp_path / "seg.nii.gz", p03)
    model = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="lung_vessels", fast=False, weights=weights)
    segmenter = build_segmenter(model)
    assert isinstance(segmenter, TotalSegmentatorSegmenter) and segmenter.crop_stage is not None
    assert sorted(segmenter.crop_stage.models) == [297] and segmenter.crop_stage.resample == [3.0] * 3
    labels = segmenter.segment(p03)
    assert np.array_equal(labels.data, judge), int((labels.data != judge).sum())
    found = np.argwhere(judge > 0)
    assert len(found) > 1000, "the task's model labelled the crop"
    extent = found.max(axis=0) - found.min(axis=0) + 1
    assert extent[1] < p03.shape[1] // 4, f"labels confined to the crop: extent {extent.tolist()} of {p03.shape}"
    assert {i.name for i in labels.labels} == set(class_map["lung_vessels"].values())


def test_missing_weights_fail_at_start_up_naming_the_folders(tmp_path: Path) -> None:
    model = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="total", fast=True, weights=tmp_path)
    with pytest.raises(PipelineError) as info:
        TotalSegmentatorSegmenter(model, torch.device("cpu"))
    text = str(info.value)
    assert f"weights not found in {tmp_path}" in text
    folder = ("Dataset297_TotalSegmentator_total_3mm_1559subj/"
              "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")
    assert folder in text and "never downloads" in text and "totalseg_download_weights -t total" in text
    multi = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="total", weights=tmp_path)
    with pytest.raises(PipelineError, match="Dataset291_.*Dataset292_.*Dataset295_"):
        TotalSegmentatorSegmenter(multi, torch.device("cpu"))


def test_tasks_that_cannot_stay_resident_are_refused(tmp_path: Path) -> None:
    for task in ("body", "vertebrae_pp"):  # the body model's and the vertebrae's own postprocessing
        with pytest.raises(PipelineError, match=f"task '{task}' needs a cascade, a crop by another task's"):
            TotalSegmentatorSegmenter(ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task=task, weights=tmp_path),
                                      torch.device("cpu"))
    with pytest.raises(PipelineError, match="Unknown task"):
        TotalSegmentatorSegmenter(ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="nope", weights=tmp_path),
                                  torch.device("cpu"))
    # a task cropped by the rough total model names that model's folder too when weights are missing
    with pytest.raises(PipelineError) as info:
        TotalSegmentatorSegmenter(ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="lung_vessels",
                                              weights=tmp_path), torch.device("cpu"))
    text = str(info.value)
    assert "Dataset117_lung_airways_arteries_veins_282subj/" in text
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj/" in text
    assert "'totalseg_download_weights -t lung_vessels' and 'totalseg_download_weights -t total_fast'" in text
