"""End to end with a real Orthanc: the PACS sends a series, the node segments it and returns SEG, SR and SC."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import load_series_dir
from dicomnode.state.store import JobState, Store
from tests.conftest import series_dir
from tests.peers import NodeProcess, Orthanc, free_port, node_config, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers

LUNG_PIPELINE = {"name": "lung-ct", "kind": "segment", "destinations": ["pacs"], "model": {"kind": "lung"},
                 "outputs": {"kinds": ["seg", "sr", "sc"], "series_number_base": 9000}}


def _node(tmp_path: Path, pacs_port: int, **extra: Any) -> NodeProcess:
    cfg = node_config(tmp_path, destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                               "port": pacs_port}],
                      pipelines=[LUNG_PIPELINE], rules=[{"name": "ct", "pipelines": ["lung-ct"],
                                                         "match": {"modality": ["CT"]}}], **extra)
    return NodeProcess(tmp_path, cfg).start()


def _derived(pacs: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Series of the study in Orthanc by modality (SEG, SR, OT, CT)."""
    (study,) = pacs.request("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    out: dict[str, list[dict[str, Any]]] = {}
    for series_id in pacs.get(f"/studies/{study}")["Series"]:
        series = pacs.get(f"/series/{series_id}")
        out.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return out


def _file(pacs: Orthanc, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instance_id}/file")))


def test_pacs_to_node_to_pacs_with_seg_sr_and_sc(tmp_path: Path) -> None:
    port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"node": ["DICOMNODE", "127.0.0.1", port]})
    node = _node(tmp_path, pacs.dicom_port, node={"port": port})
    try:
        folder = series_dir("P01")
        pacs.upload_folder(folder)
        source = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        (orthanc_series,) = pacs.series_with_uid(str(source.SeriesInstanceUID))
        pacs.request("POST", "/modalities/node/store", {"Resources": [orthanc_series], "Synchronous": True})
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 180, "lung job done")
        derived = _derived(pacs, str(source.StudyInstanceUID))
        assert sorted(derived) == ["CT", "OT", "SEG", "SR"]  # all in the source study

        (seg_series,) = derived["SEG"]
        seg = hd.seg.Segmentation.from_dataset(_file(pacs, seg_series["Instances"][0]))
        refs = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                for r in s.ReferencedInstanceSequence}
        volume = load_series_dir(folder)
        assert refs <= {s.sop_instance_uid for s in volume.slices}
        assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {str(source.SeriesInstanceUID)}
        expected = lung_mask(volume)
        sop_uids = [s.sop_instance_uid for s in volume.slices]
        for value in (1, 2, 3):
            got = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[value],
                                                    ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
            assert np.array_equal(got[..., 0].astype(bool), expected.mask(value)), f"segment {value} differs"

        (sr_series,) = derived["SR"]
        sr = _file(pacs, sr_series["Instances"][0])
        volumes = _sr_volumes_ml(sr)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        assert set(volumes) == {1, 2, 3}  # segments in label order: right lung, left lung, airways
        for value in (1, 2, 3):
            assert volumes[value] == pytest.approx(expected.mask(value).sum() * voxel_ml, rel=1e-3)
        pictures = derived["OT"]  # one Secondary Capture series each: overlays, three planes, 3D surface
        assert sorted(int(s["MainDicomTags"]["SeriesNumber"]) for s in pictures) == [9002, 9003, 9004]
        for series in pictures:
            sc = _file(pacs, series["Instances"][0])
            assert sc.BurnedInAnnotation == "YES" and sc.PatientID == source.PatientID
    finally:
        node.stop()
        pacs.stop()


def _sr_volumes_ml(sr: pydicom.Dataset) -> dict[int, float]:
    """Referenced SEG segment number -> Volume (mL, SCT 118565006) from the TID 1500 groups of an SR."""
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom accepts it as a Comprehensive 3D SR
    out: dict[int, float] = {}

    def walk(item: pydicom.Dataset) -> None:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "CONTAINER" and child.ConceptNameCodeSequence[0].CodeValue == "125007":
                ref = next(c for c in child.ContentSequence if c.ValueType == "IMAGE")
                number = int(ref.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                for c in child.ContentSequence:
                    if c.ValueType == "NUM" and c.ConceptNameCodeSequence[0].CodeValue == "118565006":
                        assert c.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "ml"
                        out[number] = float(c.MeasuredValueSequence[0].NumericValue)
            walk(child)

    walk(sr)
    return out


def test_pacs_outage_delivers_everything_once_when_it_returns(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.stop()  # the destination is down when the job runs
    node = _node(tmp_path, pacs.dicom_port, worker={"backoff_seconds": 1.0, "backoff_max_seconds": 2.0,
                                                    "max_attempts": 50})
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28
        wait_until(lambda: any(j.attempts >= 2 and j.state is JobState.QUEUED for j in store.list_jobs()), 120,
                   "a failed delivery attempt queued for retry")
        (job,) = store.list_jobs()
        assert "not yet delivered" in job.error
        pacs.start()
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 120, "delivery after the outage")
        delivered = store.deliveries(job.id)
        assert delivered and all(d.state.value == "STORED" for d in delivered)
        outputs_events = [e for e in store.events(job_id=job.id) if e.kind == "job.outputs"]
        assert len(outputs_events) == 1  # produced once; retries only re-sent
        instances = pacs.get("/instances")
        derived_uids = [pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in instances]
        assert len(derived_uids) == len(set(derived_uids)) == len(delivered)
    finally:
        node.stop()
        pacs.stop()


def test_worker_killed_mid_job_is_recovered_and_the_job_finishes(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    node = _node(tmp_path, pacs.dicom_port, worker={"lease_seconds": 600})
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P01")])) == 64
        wait_until(lambda: any(j.state is JobState.RUNNING for j in store.list_jobs()), 60, "job running")
        (job,) = store.list_jobs()
        pid = int((job.lease_owner or "").split(":")[1])
        os.kill(pid, signal.SIGKILL)  # the worker process dies mid-job; its lease would last 10 minutes
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 180, "job finished after recovery")
        kinds = [e.kind for e in store.events(job_id=job.id)]
        assert "job.requeued" in kinds
        assert store.get_job(job.id).attempts == 2  # type: ignore[union-attr]
    finally:
        node.stop()
        pacs.stop()
