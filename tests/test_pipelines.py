"""Segment pipelines through the node's own data path: offline processing, empty labels, unusable series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.errors import PipelineError
from dicomnode.imaging.labels import AIRWAYS, LUNG_LEFT, LUNG_RIGHT, LabelVolume
from dicomnode.outputs.encode import present_labels
from tests.conftest import REPO, series_dir
from tests.peers import NodeProcess, node_config, stored_count, storescu, wait_until


def test_trained_unet_pipeline_offline_makes_a_two_lung_seg(tmp_path: Path) -> None:
    out = tmp_path / "out"
    example = REPO / "config" / "dicomnode.example.yaml"
    run = subprocess.run([sys.executable, "-m", "dicomnode", "process", str(series_dir("P01")), "--pipeline",
                          "lung-ct-unet", "--out", str(out), "--config", str(example)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (seg_file,) = out.glob("SEG_*.dcm")
    seg = hd.seg.segread(seg_file)
    names = [d.SegmentLabel for d in seg.SegmentSequence]
    assert names == ["Right lung", "Left lung"]  # the model's airway label was empty: not encoded
    assert {p.name.split("_")[0] for p in out.iterdir()} == {"SEG", "SR", "OT"}
    assert all(pydicom.dcmread(p).StudyInstanceUID == seg.StudyInstanceUID for p in out.iterdir())


def test_empty_labels_are_dropped_and_all_empty_is_an_error() -> None:
    data = np.zeros((2, 4, 4), np.uint8)
    data[0, 1, 1] = LUNG_RIGHT.value
    labels = LabelVolume(data, (LUNG_RIGHT, LUNG_LEFT, AIRWAYS), "m", "1")
    assert present_labels(labels).labels == (LUNG_RIGHT,)
    with pytest.raises(PipelineError, match="found nothing to report"):
        present_labels(LabelVolume(np.zeros_like(data), (LUNG_RIGHT,), "m", "1"))


@pytest.mark.peers
def test_series_that_cannot_form_a_volume_fails_with_the_reason_and_the_node_keeps_serving(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, pipelines=[{"name": "seg", "kind": "segment", "dry_run": True,
                                            "model": {"kind": "lung"}}],
                      rules=[{"name": "all", "pipelines": ["seg"]}])
    node = NodeProcess(tmp_path, cfg).start()
    try:
        # P09: one slice stored nine times (different transfer syntaxes, same position): not a volume.
        assert stored_count(storescu(node.port, [series_dir("P09")], extra=("-xs",))) >= 1
        wait_until(lambda: node.status()["counts"]["jobs"]["FAILED"] == 1, 120, "job to fail")
        (series,) = node.status()["series"]
        assert series["state"] == "FAILED"
        assert "duplicate" in series["reason"].lower() or "slices" in series["reason"].lower(), series["reason"]
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28  # still serving
    finally:
        node.stop()
