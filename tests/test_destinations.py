"""Destinations beyond C-STORE (issue 15): STOW-RS to a real Orthanc with its DICOMweb plugin, and folders."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomnode.config import parse_config
from dicomnode.errors import DeliveryError
from dicomnode.outputs.delivery import Outcome
from dicomnode.outputs.destinations import open_sender
from dicomnode.outputs.dicomweb import StowSender
from dicomnode.outputs.folder import FolderSender
from dicomnode.outputs.scu import ScuSettings
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.store import DeliveryState, JobState, Store
from tests.conftest import series_dir
from tests.peers import NodeProcess, Orthanc, TlsProxy, node_config, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers

USERS = {"node": "s3cret-for-tests"}
PASSWORD_ENV = "DICOMNODE_TEST_STOW_PASSWORD"
WRONG_PASSWORD = "not-the-secret-7f3a"


def outbound(paths: list[Path]) -> list[OutboundFile]:
    files = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(OutboundFile(str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                  str(ds.file_meta.TransferSyntaxUID)))
    return files


def web_destination(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "web", "kind": "dicomweb", "url": url, **extra}


def basic_auth(env: str = PASSWORD_ENV) -> dict[str, Any]:
    return {"kind": "basic", "username": "node", "password_env": env}


def _node(tmp_path: Path, destinations: list[dict[str, Any]], pipelines: list[dict[str, Any]],
          **extra: Any) -> NodeProcess:
    rule = {"name": "all", "pipelines": [p["name"] for p in pipelines]}
    cfg = node_config(tmp_path, destinations=destinations, pipelines=pipelines, rules=[rule], **extra)
    return NodeProcess(tmp_path, cfg).start()


def test_a_real_job_arrives_over_stow_rs_and_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lung pipeline on P01 -> SEG, SR, RTSTRUCT over STOW-RS with basic auth from an environment variable."""
    monkeypatch.setenv(PASSWORD_ENV, USERS["node"])
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    pipeline = {"name": "lung-ct", "kind": "segment", "destinations": ["web"], "model": {"kind": "lung"},
                "outputs": {"kinds": ["seg", "sr", "rtstruct"], "series_number_base": 9000}}
    node = _node(tmp_path, [web_destination(pacs.dicomweb_url, auth=basic_auth())], [pipeline])
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P01")])) == 64
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 300, "lung job delivered over STOW-RS")
        (job,) = store.list_jobs()
        deliveries = store.deliveries(job.id)
        assert len(deliveries) == 3 and all(d.state is DeliveryState.STORED for d in deliveries)
        source = pydicom.dcmread(next(series_dir("P01").iterdir()), stop_before_pixels=True)
        (study,) = pacs.request("POST", "/tools/find", {"Level": "Study",
                                                        "Query": {"StudyInstanceUID": str(source.StudyInstanceUID)}})
        modalities = sorted(pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                            for s in pacs.get(f"/studies/{study}")["Series"])
        assert modalities == ["RTSTRUCT", "SEG", "SR"]  # in the source's study, nothing else
        for d in deliveries:  # what Orthanc holds is what the outbox holds
            (instance,) = pacs.request("POST", "/tools/find", {"Level": "Instance",
                                                               "Query": {"SOPInstanceUID": d.sop_uid}})
            held = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instance}/file")))
            assert held == pydicom.dcmread(d.path)
        assert "Traceback" not in node.log() and USERS["node"] not in node.log()
    finally:
        node.stop()
        pacs.stop()


def test_stow_rs_destination_down_is_retried_then_delivered(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True)
    pacs.stop()  # down when the job runs: connection refused
    pipeline = {"name": "archive", "kind": "forward", "destinations": ["web"]}
    node = _node(tmp_path, [web_destination(pacs.dicomweb_url)], [pipeline],
                 worker={"backoff_seconds": 1.0, "backoff_max_seconds": 2.0, "max_attempts": 50})
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28
        wait_until(lambda: any(j.attempts >= 2 and j.state is JobState.QUEUED for j in store.list_jobs()), 120,
                   "a failed STOW-RS attempt queued for retry")
        (job,) = store.list_jobs()
        assert "not yet delivered" in job.error and "ConnectionError" in job.error
        pacs.start()
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 120, "delivery once Orthanc is back")
        delivered = store.deliveries(job.id)
        assert all(d.state is DeliveryState.STORED for d in delivered)
        assert len(pacs.get("/instances")) == 28
        for d in delivered[:3]:  # the bytes sent are the bytes received from the modality
            (instance,) = pacs.request("POST", "/tools/find", {"Level": "Instance",
                                                               "Query": {"SOPInstanceUID": d.sop_uid}})
            assert pacs.get(f"/instances/{instance}/file") == Path(d.path).read_bytes()
    finally:
        node.stop()
        pacs.stop()


def test_stow_rs_refusals_fail_the_job_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """401 (wrong password) and 404 (wrong path) are permanent: FAILED at the first attempt, with the reason."""
    monkeypatch.setenv(PASSWORD_ENV, WRONG_PASSWORD)
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    root = f"http://127.0.0.1:{pacs.http_port}"
    destinations = [{**web_destination(pacs.dicomweb_url, auth=basic_auth()), "name": "bad-auth"},
                    {**web_destination(f"{root}/no-such-dicom-web", auth={"kind": "basic", "username": "node",
                                                                          "password": USERS["node"]}),
                     "name": "bad-path"}]
    pipelines = [{"name": "a", "kind": "forward", "destinations": ["bad-auth"]},
                 {"name": "b", "kind": "forward", "destinations": ["bad-path"]}]
    node = _node(tmp_path, destinations, pipelines, worker={"max_attempts": 5})
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28
        wait_until(lambda: node.status()["counts"]["jobs"]["FAILED"] == 2, 120, "both jobs FAILED")
        by_pipeline = {j.pipeline: j for j in store.list_jobs()}
        assert "HTTP 401" in by_pipeline["a"].error and by_pipeline["a"].attempts == 1
        assert "HTTP 404" in by_pipeline["b"].error and by_pipeline["b"].attempts == 1
        assert pacs.get("/instances") == []
        assert USERS["node"] not in node.log() and WRONG_PASSWORD not in node.log()  # no secret in the log
    finally:
        node.stop()
        pacs.stop()


def test_stow_rs_answers_are_classified_per_instance(tmp_path: Path) -> None:
    """Orthanc refuses an instance without a StudyInstanceUID (Failure Reason 0xC000) and keeps the other."""
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        good, other = sorted(series_dir("P03").iterdir())[:2]
        broken = pydicom.dcmread(other)
        broken.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        del broken.StudyInstanceUID
        bad = tmp_path / "bad.dcm"
        broken.save_as(bad)
        cfg = parse_config({"destinations": [web_destination(pacs.dicomweb_url)]})
        sender = StowSender(cfg.destinations[0])
        try:
            results = sender.send(outbound([good, bad]))
        finally:
            sender.close()
        assert [r.outcome for r in results] == [Outcome.STORED, Outcome.PERMANENT]
        assert results[1].status == 0xC000 and "0xC000" in results[1].detail
        assert len(pacs.get("/instances")) == 1
    finally:
        pacs.stop()


def _server_certificate(folder: Path) -> tuple[Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (CA certificate, server PEM with key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=dicomnode test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    pem = folder / "server.pem"
    pem.write_bytes((folder / "server.crt").read_bytes() + (folder / "server.key").read_bytes())
    return folder / "ca.crt", pem


def test_stow_rs_verifies_tls_by_default_and_trusts_a_given_ca(tmp_path: Path) -> None:
    """HTTPS (socat in front of Orthanc) with a certificate from a private CA: refused (permanent) with the
    system's CAs, stored with ``ca_file``."""
    ca, pem = _server_certificate(tmp_path / "certs")
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True)
    proxy = TlsProxy(pem, pacs.http_port)
    try:
        url = f"https://127.0.0.1:{proxy.port}/dicom-web"
        files = outbound(sorted(series_dir("P03").iterdir())[:2])
        cfg = parse_config({"destinations": [web_destination(url),
                                             {**web_destination(url, ca_file=str(ca)), "name": "ca"}]})
        untrusted = StowSender(cfg.destinations[0])
        with pytest.raises(DeliveryError) as info:
            untrusted.send(files)
        untrusted.close()
        assert not info.value.retryable and "TLS verification failed" in str(info.value)
        trusted = StowSender(cfg.destinations[1])
        results = trusted.send(files)
        trusted.close()
        assert [r.outcome for r in results] == [Outcome.STORED] * 2
        assert len(pacs.get("/instances")) == 2
    finally:
        proxy.stop()
        pacs.stop()


def test_credentials_from_a_missing_environment_variable_are_a_permanent_failure() -> None:
    os.environ.pop("DICOMNODE_TEST_UNSET_VARIABLE", None)
    cfg = parse_config({"destinations": [web_destination("http://127.0.0.1:9/dicom-web",
                                                         auth=basic_auth("DICOMNODE_TEST_UNSET_VARIABLE"))]})
    with pytest.raises(DeliveryError) as info:
        open_sender(cfg.destinations[0], ScuSettings("NODE"))
    assert not info.value.retryable
    assert "environment variable DICOMNODE_TEST_UNSET_VARIABLE" in str(info.value) and "not set" in str(info.value)


# ------------------------------------------------------------------------------------------------ folder


def test_folder_destination_writes_durable_files_named_by_uids_idempotently(tmp_path: Path) -> None:
    paths = sorted(series_dir("P03").iterdir())[:3]
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    cfg = parse_config({"destinations": [{"name": "results", "kind": "folder", "path": str(tmp_path / "out")}]})
    sender = open_sender(cfg.destinations[0], ScuSettings("NODE"))
    assert isinstance(sender, FolderSender)
    results = sender.send(outbound(paths))
    assert [r.outcome for r in results] == [Outcome.STORED] * 3
    series = tmp_path / "out" / str(source.SeriesInstanceUID)
    written = sorted(series.iterdir())
    assert [p.name for p in written] == sorted(f"{f.sop_uid}.dcm" for f in outbound(paths))
    assert {p.read_bytes() for p in written} == {p.read_bytes() for p in paths}  # the bytes as stored
    assert [p.name for p in (tmp_path / "out").iterdir()] == [series.name]  # no temporary files, no names
    mtimes = [p.stat().st_mtime_ns for p in written]
    again = sender.send(outbound(paths))  # a retry: nothing new is written
    assert all(r.outcome is Outcome.STORED and "already" in r.detail for r in again)
    assert [p.stat().st_mtime_ns for p in written] == mtimes
    written[0].write_bytes(b"half a file")  # a damaged copy is replaced by the real one
    sender.send(outbound(paths[:1]))
    assert written[0].read_bytes() == paths[0].read_bytes()


def test_folder_destination_in_a_real_node(tmp_path: Path) -> None:
    out = tmp_path / "results"
    node = _node(tmp_path, [{"name": "results", "kind": "folder", "path": str(out)}],
                 [{"name": "archive", "kind": "forward", "destinations": ["results"]}])
    try:
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 120, "forward job done")
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert len(files) == 28
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        identifiers = {str(source.PatientID), str(source.PatientName)} - {""}
        for path in files:  # only UIDs in the paths, never the patient's identifiers
            relative = str(path.relative_to(out))
            assert not any(value in relative for value in identifiers)
            assert all(part.replace(".", "").replace("dcm", "").isdigit() for part in path.relative_to(out).parts)
    finally:
        node.stop()


def _stow_item(sop_uid: str, **reason: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = sop_uid
    for keyword, value in reason.items():
        setattr(item, keyword, value)
    return item


def test_stow_rs_response_bodies_are_read_per_instance() -> None:
    """The PS3.18 response of a 202: failure reasons classified like C-STORE statuses, warnings stored, and an
    instance the server does not mention retried (a 200 that does not mention it means stored)."""
    from dicomnode.outputs.dicomweb import _per_instance

    files = [OutboundFile(f"/x/{i}", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
             for i in range(4)]
    body = pydicom.Dataset()
    body.FailedSOPSequence = [_stow_item("1.2.3.0", FailureReason=0xA700), _stow_item("1.2.3.1", FailureReason=0xC000)]
    body.ReferencedSOPSequence = [_stow_item("1.2.3.2", WarningReason=0xB000)]
    results = _per_instance(files, body, 202)
    assert [r.outcome for r in results] == [Outcome.RETRYABLE, Outcome.PERMANENT, Outcome.STORED, Outcome.RETRYABLE]
    assert [r.status for r in results] == [0xA700, 0xC000, 0xB000, None]
    assert [r.outcome for r in _per_instance(files, pydicom.Dataset(), 200)] == [Outcome.STORED] * 4
