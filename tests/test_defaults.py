"""The node as a newcomer meets it: no configuration at all, a chest CT and an MR sent with storescu.

The embedded default runs the classical lung pipeline on CT series (ORIGINAL, at least 20 slices) and ignores
everything else with the reason. Only ports and the quiet period are overridden (``--set``), and the data go
to ``DICOMNODE_HOME``. The patient's name is one highdicom warns about ("Doe John", no caret): neither it nor
the PatientID may appear in the node's log.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import series_dir
from tests.peers import NodeProcess, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers

PATIENT_NAME = "Doe John"
PATIENT_ID = "PID-4711-XQ"
UID_PATH = re.compile(r"^[0-9.]+(\.dcm)?$")


def renamed_copy(source: Path, target: Path) -> str:
    """Copy every file of ``source`` into ``target`` with PatientName/PatientID replaced; return the series UID."""
    target.mkdir(parents=True)
    uid = ""
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.save_as(target / path.name)
        uid = str(ds.SeriesInstanceUID)
    return uid


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("defaults")
    ct_uid = renamed_copy(series_dir("P01"), workdir / "ct")
    node = NodeProcess(workdir, None, overrides={"completion.quiet_seconds": 1.0, "worker.poll_seconds": 0.2})
    node.start()
    try:
        assert stored_count(storescu(node.port, [workdir / "ct"])) == 64
        mr = sorted(series_dir("P04").iterdir())[:10]
        assert stored_count(storescu(node.port, mr)) == 10

        def settled() -> bool:
            states = {s["series_uid"]: s["state"] for s in node.status()["series"]}
            return len(states) == 2 and states[ct_uid] in ("DONE", "FAILED")

        wait_until(settled, 240, "the default pipeline to finish", interval=0.5)
    finally:
        node.stop()
    yield node, ct_uid


def test_default_config_runs_the_lung_pipeline_on_ct_and_ignores_the_rest(processed: Any) -> None:
    node, ct_uid = processed
    series = {s["series_uid"]: s for s in node.status()["series"]}
    assert series[ct_uid]["state"] == "DONE", series[ct_uid]
    assert "rule(s) ct-original -> lung" in series[ct_uid]["reason"]
    (mr,) = [s for uid, s in series.items() if uid != ct_uid]
    assert mr["state"] == "IGNORED" and "matched no rule (ct-original: Modality 'MR')" in mr["reason"]
    assert node.home.joinpath("dicomnode.sqlite3").is_file()  # the data live in DICOMNODE_HOME

    # The results were delivered to the default folder destination under the storage path, in folders and
    # files named by UIDs only: results/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    results = node.home / "results"
    files = sorted(p for p in results.rglob("*") if p.is_file())
    assert files and all(len(p.relative_to(results).parts) == 2 for p in files)
    kinds = sorted({pydicom.dcmread(p, stop_before_pixels=True).Modality for p in files})
    assert kinds == ["OT", "SEG", "SR"], kinds
    for path in files:
        rel = path.relative_to(node.home)
        assert all(UID_PATH.match(part) for part in rel.parts[1:]), rel
        assert PATIENT_ID not in str(path) and "Doe" not in str(path)
    refs = {str(pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID)
            for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"}
    assert refs == {ct_uid}


def test_log_tells_each_series_story_without_patient_identifiers(processed: Any) -> None:
    node, ct_uid = processed
    text = node.log()
    assert re.search(rf"INFO .*series {re.escape(ct_uid)} \(CT, 64 instance\(s\)\) complete: "
                     r"(no instance for|association released).*"
                     r"rule\(s\) ct-original -> lung", text), text[-3000:]
    assert re.search(r"INFO .*series [0-9.]+ \(MR, 10 instance\(s\)\) ignored: .*Modality 'MR'", text)
    assert re.search(r"INFO .*job \d+: pipeline lung on series " + re.escape(ct_uid), text)
    assert re.search(r"INFO .*job \d+: \d+ object\(s\) in .*outbox.*; destinations: ", text)
    assert re.search(r"INFO .*job \d+ pipeline=lung series=" + re.escape(ct_uid) + r" -> DONE", text)
    assert re.search(r"INFO .*job \d+: results for results \(.*results\): \d+ STORED", text)
    for needle in (PATIENT_NAME, "Doe", "John", PATIENT_ID):
        assert needle not in text, [line for line in text.splitlines() if needle in line][:3]
    assert not re.search(r" (INFO|WARNING) \S+ highdicom", text), "highdicom INFO lines reach the log"
