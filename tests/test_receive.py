"""Receiving with real peers: DCMTK storescu as the modality, Orthanc as the PACS, storescp as a destination."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.state.store import Store
from tests.conftest import series_dir
from tests.peers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    dcmtk,
    node_config,
    stored_count,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.peers


@pytest.fixture
def node(tmp_path: Path) -> Any:
    started: list[NodeProcess] = []

    def make(**sections: Any) -> NodeProcess:
        n = NodeProcess(tmp_path, node_config(tmp_path, **sections)).start()
        started.append(n)
        return n

    yield make
    for n in started:
        try:
            n.stop()
        except Exception:
            n.kill9()


def _series_by_uid(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["series_uid"]: s for s in status["series"]}


def _uid(folder: Path, keyword: str = "SeriesInstanceUID") -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True)[keyword].value)


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the preamble and file meta group (what was on the wire)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL, explicit VR: tag 4 + VR 2 + len 2
    return raw[144 + group_len:]


def test_three_series_one_study_are_kept_apart(node: Any) -> None:
    n = node(completion={"quiet_seconds": 600, "on_release": "off"})
    folders = [series_dir("P03"), series_dir("P01"), series_dir("P12")]
    out = storescu(n.port, folders)
    assert out.returncode == 0 and stored_count(out) == 156, out.stderr
    series = _series_by_uid(n.status())
    expected = {_uid(f): count for f, count in zip(folders, (28, 64, 64), strict=True)}
    assert {uid: series[uid]["instances"] for uid in expected} == expected
    assert len(series) == 3
    assert _uid(folders[1], "StudyInstanceUID") == _uid(folders[2], "StudyInstanceUID")  # same study, two series
    assert all(s["state"] == "RECEIVING" and s["calling_aet"] == "MODALITY" for s in series.values())


def test_compressed_series_are_accepted_and_stored_byte_identical(node: Any, tmp_path: Path) -> None:
    n = node(completion={"quiet_seconds": 600, "on_release": "off"})
    # storescu proposes compressed syntaxes only when asked: -xr RLE, -xv JPEG 2000 lossless.
    for folder, propose in ((series_dir("P10"), "-xr"), (series_dir("P11"), "-xv")):
        out = storescu(n.port, [folder], extra=(propose,))
        assert out.returncode == 0 and stored_count(out) == 64, out.stderr
        spooled = {p.stem: p for p in (tmp_path / "data" / "spool" / _uid(folder)).glob("*.dcm")}
        assert len(spooled) == 64
        for src in folder.iterdir():
            original = pydicom.dcmread(src)
            kept = pydicom.dcmread(spooled[str(original.SOPInstanceUID)])
            assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert kept.PixelData == original.PixelData  # the compressed fragments, untouched
            assert kept == original  # every element equal (storescu re-encodes sequence lengths on the wire)


def test_stored_bytes_are_the_bytes_on_the_wire(node: Any, tmp_path: Path) -> None:
    """Streamed straight from the files (no re-encoding by the sender), the spool holds identical bytes."""
    n = node(completion={"quiet_seconds": 600, "on_release": "off"})
    files = sorted(series_dir("P11").iterdir())[:8] + sorted(series_dir("P10").iterdir())[:8]
    metas = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    ae = AE(ae_title="MODALITY")
    for ts in sorted({str(m.file_meta.TransferSyntaxUID) for m in metas}):
        ae.add_requested_context(CTImageStorage, ts)
    # each file streams as stored: STORE_SEND_CHUNKED_DATASET, set for the whole test process by conftest
    assoc = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert [assoc.send_c_store(p).Status for p in files] == [0] * len(files)
    assoc.release()
    for path, meta in zip(files, metas, strict=True):
        kept = tmp_path / "data" / "spool" / str(meta.SeriesInstanceUID) / f"{meta.SOPInstanceUID}.dcm"
        assert _dataset_bytes(kept) == _dataset_bytes(path)


def test_repeated_instances_count_once(node: Any) -> None:
    n = node(completion={"quiet_seconds": 600, "on_release": "off"})
    folder = series_dir("P03")
    for _ in range(2):
        assert stored_count(storescu(n.port, [folder])) == 28
    (row,) = n.status()["series"]
    assert row["instances"] == 28


def test_unknown_calling_ae_is_rejected(node: Any) -> None:
    n = node(node={"allowed_calling_aets": ["MODALITY"]})
    bad = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(n.port)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
    good = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(n.port)],
                          capture_output=True, text=True, timeout=30)
    assert good.returncode == 0, good.stderr


def test_malformed_dataset_gets_failure_status_and_node_keeps_serving(node: Any, tmp_path: Path) -> None:
    n = node(completion={"quiet_seconds": 600, "on_release": "off"})
    src = pydicom.dcmread(next(series_dir("P03").iterdir()))
    good = tmp_path / "good.dcm"
    src.save_as(good, enforce_file_format=True)
    # A valid file meta followed by a data set whose first element claims more bytes than exist.
    meta_end = len(good.read_bytes()) - len(_dataset_bytes(good))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f1.2.3")
    truncated = tmp_path / "truncated.dcm"  # a header without its pixels: a transfer cut short
    truncated.write_bytes(good.read_bytes()[:meta_end + 5000])
    no_uids = tmp_path / "no_uids.dcm"
    del src.SeriesInstanceUID
    src.save_as(no_uids, enforce_file_format=True)

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [str(src.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(p).Status for p in (broken, truncated, no_uids, good)]
    assoc.release()
    assert statuses == [0xC000, 0xA900, 0xC000, 0x0000]
    log = n.log()
    assert "refused with 0xC000: data set lacks StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID" in log
    assert "refused with 0xA900: image data set (Rows/Columns present) has no Pixel Data" in log
    assert "refused with 0xC000: data set lacks SeriesInstanceUID" in log
    spool = tmp_path / "data" / "spool"
    assert [p.name for p in spool.rglob("*") if p.is_file()] == [f"{src.SOPInstanceUID}.dcm"]


def test_out_of_space_answers_a700_and_stores_nothing(node: Any, tmp_path: Path) -> None:
    n = node(storage={"min_free_mb": 2**40})
    out = storescu(n.port, [series_dir("P03")])
    assert stored_count(out) == 0
    assert (out.stdout + out.stderr).count("Received Store Response (Refused: OutOfResources)") == 28  # 0xA700
    assert n.status()["series"] == []
    assert not [p for p in (tmp_path / "data" / "spool").rglob("*") if p.is_file()]


def test_kill9_mid_send_loses_no_acknowledged_instance(node: Any, tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "dest")
    try:
        dest = {"name": "archive", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}
        sections = {"completion": {"quiet_seconds": 1.0}, "destinations": [dest],
                    "pipelines": [{"name": "forward", "kind": "forward", "destinations": ["archive"]}],
                    "rules": [{"name": "all", "pipelines": ["forward"]}]}
        n = node(**sections)
        folder = series_dir("P01")
        proc = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-R", "-aet", "MODALITY", "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(n.port),
             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"TCP_NODELAY": "1"})
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sum("Received Store Response (Success)" in x for x in lines) == 20:
                n.kill9()
                break
        rest, _ = proc.communicate(timeout=60)
        lines.extend(rest.splitlines())
        acked = _acknowledged_files(lines)
        assert len(acked) >= 20
        n.start()  # same config, same storage: recovery runs first
        spool = tmp_path / "data" / "spool" / _uid(folder)
        for path in acked:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert (spool / f"{sop}.dcm").exists(), f"acknowledged {path.name} lost"
        (row,) = n.status()["series"]
        assert row["instances"] >= len(acked)
        # The rest of the series arrives, the series completes and is forwarded in full.
        assert stored_count(storescu(n.port, [folder])) == 64
        wait_until(lambda: n.status()["series"][0]["state"] == "DONE", 120, "series forwarded")
        assert len(scp.files()) == 64
    finally:
        scp.stop()


def _acknowledged_files(lines: list[str]) -> list[Path]:
    """Files storescu saw answered with success: each 'Sending file' followed by a success response."""
    acked, current = [], None
    for line in lines:
        m = re.search(r"Sending file: (.+)$", line.strip())
        if m:
            current = Path(m.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def test_orthanc_pushes_series_and_node_forwards_it_intact(node: Any, tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "dest")
    n = node(destinations=[{"name": "archive", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
             pipelines=[{"name": "forward", "kind": "forward", "destinations": ["archive"]}],
             rules=[{"name": "ct", "pipelines": ["forward"], "match": {"modality": ["CT"]}}])
    pacs = Orthanc(tmp_path / "orthanc", modalities={"node": ["DICOMNODE", "127.0.0.1", n.port]})
    try:
        folder = series_dir("P03")
        pacs.upload_folder(folder)
        (orthanc_series,) = pacs.series_with_uid(_uid(folder))
        pacs.request("POST", "/modalities/node/store", {"Resources": [orthanc_series], "Synchronous": True})
        wait_until(lambda: any(s["state"] == "DONE" for s in n.status()["series"]), 60, "forward done")
        received = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in scp.files()}
        assert len(received) == 28
        for src in folder.iterdir():
            original = pydicom.dcmread(src)
            copy = received[str(original.SOPInstanceUID)]
            assert copy.PixelData == original.PixelData
            assert copy.SeriesInstanceUID == original.SeriesInstanceUID
        (row,) = n.status()["series"]
        assert "rule(s) ct -> forward" in row["reason"]
    finally:
        pacs.stop()
        scp.stop()


def test_permanent_rejection_fails_the_job_without_endless_retries(node: Any, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.stop()
    pacs.config["DicomCheckCalledAet"] = True  # a wrong called AE title: association rejected, permanently
    pacs.start()
    try:
        n = node(destinations=[{"name": "pacs", "ae_title": "NOTORTHANC", "host": "127.0.0.1",
                                "port": pacs.dicom_port}],
                 pipelines=[{"name": "forward", "kind": "forward", "destinations": ["pacs"]}],
                 rules=[{"name": "all", "pipelines": ["forward"]}], worker={"max_attempts": 50})
        assert stored_count(storescu(n.port, [series_dir("P03")])) == 28
        wait_until(lambda: n.status()["counts"]["jobs"]["FAILED"] == 1, 60, "job to fail")
        (row,) = n.status()["series"]
        assert row["state"] == "FAILED"
        assert "rejected (Rejected Permanent" in row["reason"], row["reason"]
        (job,) = Store(tmp_path / "data" / "dicomnode.sqlite3").list_jobs()
        assert job.attempts == 1  # a permanent rejection is not retried
    finally:
        pacs.stop()


def test_receiving_continues_while_the_node_is_busy(node: Any) -> None:
    """Two modalities at once, over separate associations, both complete."""
    n = node(completion={"quiet_seconds": 600, "on_release": "off"}, node={"receivers": 2})
    results: dict[str, int] = {}

    def send(key: str, folder: Path) -> None:
        results[key] = stored_count(storescu(n.port, [folder], aet=key))

    threads = [threading.Thread(target=send, args=(k, series_dir(p))) for k, p in (("CT1", "P01"), ("CT2", "P12"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"CT1": 64, "CT2": 64}
    series = n.status()["series"]
    assert sorted((s["calling_aet"], s["instances"]) for s in series) == [("CT1", 64), ("CT2", 64)]
    # "serving" is logged once both receivers accept from the shared socket
    assert {m.group(1) for m in re.finditer(r" (receiver-\d) dicomnode.receive.scp: listening as", n.log())} == {
        "receiver-0", "receiver-1"}


def test_a_port_in_use_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    """A second node (or anything else) on the port: serve fails at once; it never shares the port."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        n = NodeProcess(tmp_path, node_config(tmp_path, node={"host": "127.0.0.1", "port": port}))
        out = subprocess.run([sys.executable, "-m", "dicomnode", "serve", "-c", str(n.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
