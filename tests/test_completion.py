"""Series completion on evidence: at the sender's release when the images form a complete volume, else after
the quiet period; a late instance reopens the series and its outputs are superseded (same UIDs)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from dicomnode.imaging.completeness import judge_stack
from dicomnode.state import jobs
from dicomnode.state.store import InstanceMeta, SeriesRow, Store
from tests.conftest import series_dir
from tests.peers import NodeProcess, Orthanc, node_config, stored_count, storescu, wait_until


def _files(prefix: str) -> list[Path]:
    return sorted(p for p in series_dir(prefix).iterdir() if p.is_file())


def _by_position(prefix: str) -> list[Path]:
    """The series' files ordered along the patient's z axis (slice order)."""
    paths = _files(prefix)
    z = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths}
    return sorted(paths, key=z.__getitem__)


# ------------------------------------------------------------------------------------------ the judge


def test_complete_series_are_recognised() -> None:
    for prefix in ("P01", "P03", "P06", "P07", "P08"):  # single-frame CT and MR, enhanced multi-frame
        evidence = judge_stack(_files(prefix))
        assert evidence.complete, (prefix, evidence.reason)
    assert "64 slices" in judge_stack(_files("P01")).reason


def test_a_missing_middle_slice_is_a_gap() -> None:
    ordered = _by_position("P01")
    evidence = judge_stack(ordered[:30] + ordered[31:])
    assert not evidence.complete and "not evenly spaced" in evidence.reason


@pytest.mark.parametrize(("prefix", "why"), [("P02", "not evenly spaced"), ("P09", "duplicate slice positions")])
def test_irregular_or_non_volumes_are_no_evidence(prefix: str, why: str) -> None:
    evidence = judge_stack(_files(prefix))
    assert not evidence.complete and why in evidence.reason


def test_fewer_images_than_stated_is_no_evidence(tmp_path: Path) -> None:
    ordered = _by_position("P03")
    copies = []
    for i, path in enumerate(ordered):
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = len(ordered)
        copies.append(tmp_path / f"{i:03d}.dcm")
        ds.save_as(copies[-1])
    assert judge_stack(copies).complete
    short = judge_stack(copies[:-1])  # the last slice not yet here: evenly spaced, but short of the count
    assert not short.complete and "ImagesInAcquisition" in short.reason


def test_unreadable_files_are_no_evidence(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"\0" * 200)
    assert not judge_stack([bad, bad]).complete


# ------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(("value", "expected"), [("evidence", "evidence"), ("off", "off"), (2, 2.0), (0.5, 0.5)])
def test_on_release_config(value: Any, expected: Any) -> None:
    assert parse_config({"completion": {"on_release": value}}).completion.on_release == expected


def test_on_release_defaults_to_evidence_and_rejects_other_words() -> None:
    assert parse_config(None).completion.on_release == "evidence"
    with pytest.raises(ConfigError, match="completion.on_release"):
        parse_config({"completion": {"on_release": "soon"}})
    with pytest.raises(ConfigError, match="must not be negative"):
        parse_config({"completion": {"on_release": -1}})


def _released_series(tmp_path: Path) -> Store:
    store = Store(tmp_path / "db.sqlite3")
    meta = InstanceMeta(sop_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="1.2.3",
                        study_uid="1.2", transfer_syntax="1.2.840.10008.1.2")
    store.record_instance(meta, tmp_path / "a.dcm", 10, now=100.0, reprocess_late=True)
    store.mark_released(["1.2.3"], now=101.0)
    return store


def test_evidence_is_asked_only_for_released_series(tmp_path: Path) -> None:
    store = _released_series(tmp_path)
    asked: list[str] = []

    def judge(row: SeriesRow) -> tuple[bool, str]:
        asked.append(row.series_uid)
        return True, "4 slices"

    due = jobs.due_series(store, now=102.0, quiet_seconds=30, on_release="evidence", evidence=judge)
    assert [(r.series_uid, why) for r, why in due] == [
        ("1.2.3", "association released and the instances form a complete volume (4 slices)")]
    assert jobs.due_series(store, now=102.0, quiet_seconds=30, on_release="off", evidence=judge) == []
    assert jobs.due_series(store, now=102.0, quiet_seconds=30, on_release=5.0, evidence=judge) == []
    assert len(jobs.due_series(store, now=106.0, quiet_seconds=30, on_release=5.0, evidence=judge)) == 1
    assert asked == ["1.2.3"]
    no = jobs.due_series(store, now=102.0, quiet_seconds=30, on_release="evidence",
                         evidence=lambda row: (False, "a gap"))
    assert no == []
    assert len(jobs.due_series(store, now=131.0, quiet_seconds=30, on_release="evidence",
                               evidence=lambda row: (False, "a gap"))) == 1  # the quiet period still counts


# ------------------------------------------------------------------------------------------ live


LUNG = {"name": "lung-ct", "kind": "segment", "destinations": ["pacs"], "model": {"kind": "lung"},
        "outputs": {"kinds": ["seg", "sr", "sc"], "series_number_base": 9000}}


def _node(tmp_path: Path, pacs_port: int, on_release: str, quiet: float) -> NodeProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = node_config(tmp_path, completion={"quiet_seconds": quiet, "on_release": on_release},
                      destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                     "port": pacs_port}],
                      pipelines=[LUNG], rules=[{"name": "ct", "pipelines": ["lung-ct"],
                                                "match": {"modality": ["CT"]}}])
    return NodeProcess(tmp_path, cfg).start()


def _series(node: NodeProcess) -> dict[str, Any]:
    (row,) = node.status()["series"]
    return dict(row)


def _send(node: NodeProcess, paths: list[Path], folder: Path) -> None:
    folder.mkdir()
    for p in paths:
        shutil.copy(p, folder / p.name)
    assert stored_count(storescu(node.port, [folder])) == len(paths)


@pytest.mark.peers
def test_a_series_sent_in_one_association_completes_at_release(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    node = _node(tmp_path / "evidence", pacs.dicom_port, "evidence", quiet=300)
    try:
        _send(node, _files("P01"), tmp_path / "send")
        wait_until(lambda: _series(node)["state"] == "DONE", 120, "series done long before the quiet period")
        reason = _series(node)["reason"]
        assert "association released and the instances form a complete volume (64 slices" in reason
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.peers
def test_with_the_rule_off_the_quiet_period_decides(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path, completion={"quiet_seconds": 4, "on_release": "off"})).start()
    try:
        _send(node, _files("P03"), tmp_path / "send")
        assert _series(node)["state"] == "RECEIVING"
        wait_until(lambda: _series(node)["state"] == "IGNORED", 60, "quiet period")
        assert "no instance for" in _series(node)["reason"]
    finally:
        node.stop()


def _derived_instances(pacs: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs in the PACS per derived modality (SEG, SR, OT) of the study."""
    (study,) = pacs.request("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    out: dict[str, list[str]] = {}
    for series_id in pacs.get(f"/studies/{study}")["Series"]:
        series = pacs.get(f"/series/{series_id}")
        modality = series["MainDicomTags"]["Modality"]
        if modality == "CT":
            continue
        for instance in series["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instance}/file")), stop_before_pixels=True)
            out.setdefault(modality, []).append(str(ds.SOPInstanceUID))
    return out


@pytest.mark.peers
def test_late_slices_reopen_the_series_and_supersede_its_outputs(tmp_path: Path) -> None:
    """The last slice arrives after the release of the first association: the first 63 already form an evenly
    spaced volume, so it completes and its results go out; the late slice reprocesses it (generation 2) and
    the PACS ends up with one set of results (same UIDs). A middle slice missing at release is a gap: no early
    judgement; when it arrives in a second association, that release completes the series."""
    pacs = Orthanc(tmp_path / "orthanc")
    node = _node(tmp_path / "node", pacs.dicom_port, "evidence", quiet=6)
    try:
        ordered = _by_position("P12")
        _send(node, ordered[:-1], tmp_path / "first")
        wait_until(lambda: _series(node)["state"] == "DONE", 120, "first generation done")
        study = str(pydicom.dcmread(ordered[0], stop_before_pixels=True).StudyInstanceUID)
        first = _derived_instances(pacs, study)
        _send(node, ordered[-1:], tmp_path / "late")
        wait_until(lambda: _series(node)["generation"] == 2 and _series(node)["state"] == "DONE", 120,
                   "second generation done")
        assert "complete volume (64 slices" in _series(node)["reason"]
        second = _derived_instances(pacs, study)
        assert len(second["SEG"]) == 1 and len(second["SR"]) == 1  # superseded, not duplicated
        assert second["SEG"] == first["SEG"] and second["SR"] == first["SR"]
        jobs_done = node.status()["counts"]["jobs"]["DONE"]
        assert jobs_done == 2

        middle = _by_position("P01")
        _send(node, middle[:30] + middle[31:], tmp_path / "gap")
        wait_until(lambda: len(node.status()["series"]) == 2, 30, "second series recorded")
        gapped = next(s for s in node.status()["series"] if s["instances"] == 63)
        assert gapped["state"] == "RECEIVING"  # a gap is no evidence: waiting for the quiet period
        _send(node, [middle[30]], tmp_path / "middle")  # a second association, before the quiet period ends
        wait_until(lambda: all(s["state"] == "DONE" for s in node.status()["series"]), 120, "gap filled, done")
        filled = next(s for s in node.status()["series"] if s["series_uid"] == gapped["series_uid"])
        assert filled["generation"] == 1 and "complete volume (64 slices" in filled["reason"]
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.peers
def test_a_release_wakes_an_idle_worker_at_once(tmp_path: Path) -> None:
    """The receiver rings the workers' bell when a sender releases: an idle worker judges the series then,
    not at its next poll (here a minute away; the default is half a second, which the bell saves too)."""
    cfg = node_config(tmp_path, completion={"quiet_seconds": 300, "on_release": "evidence"},
                      worker={"poll_seconds": 60})
    node = NodeProcess(tmp_path, cfg).start()
    try:
        wait_until(lambda: "worker 0 ready" in node.log(), 120, "worker ready")
        _send(node, _files("P03"), tmp_path / "send")
        wait_until(lambda: _series(node)["state"] != "RECEIVING", 15, "the series judged at the release")
        assert "association released" in _series(node)["reason"]
    finally:
        node.stop()
