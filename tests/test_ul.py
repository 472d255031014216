"""The Storage SCP's upper layer (dicomnode.receive.upper_layer) at the protocol level: negotiation, limits,
timeouts, fragments, unexpected PDUs and DIMSE requests it does not serve. The SCP runs in this process (as a receiver
process would run it); peers are pynetdicom, DCMTK and, for what no well-behaved peer sends, raw bytes on a socket."""

from __future__ import annotations

import dataclasses
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode import IMPLEMENTATION_CLASS_UID
from dicomnode.config import parse_config
from dicomnode.ops.service import open_spool
from dicomnode.receive.connection import UpperLayerServer
from dicomnode.receive.dimse import decode_command
from dicomnode.receive.pdu import pdata_pdus
from dicomnode.receive.scp import ReceiveContext, acceptor_settings, capabilities, listen
from dicomnode.state.store import Store
from tests.conftest import series_dir
from tests.peers import PEER_ENV, dcmtk, node_config, wait_until
from tests.scp_peer import associate_rq, rejection
from tests.scp_peer import command as _command
from tests.scp_peer import raw_associate as _raw_associate
from tests.scp_peer import read_pdu as _read_pdu


def _echo(port: int, aec: str = "DICOMNODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-v", "-aet", "MODALITY", "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=PEER_ENV)


def _ae(*syntaxes: str, max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(CTImageStorage, list(syntaxes) or [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    return ae


def _assert_aborted_by_node(sock: socket.socket) -> None:
    pdu_type, body = _read_pdu(sock)
    assert pdu_type == 0x07 and body[2] == 2, (pdu_type, body)  # A-ABORT, source: service provider


def test_echo_and_storage_over_default_settings(scp: Any) -> None:
    s = scp()
    out = _echo(s.port)
    assert out.returncode == 0, out.stderr
    files = sorted(series_dir("P03").iterdir())[:3]
    assoc = _ae(ImplicitVRLittleEndian).associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files] == [0, 0, 0]
    assoc.release()
    assert s.instances() == 3
    kept = pydicom.dcmread(s.files()[0])
    assert kept.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert kept.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


def test_called_ae_title_must_be_ours(scp: Any) -> None:
    s = scp()
    out = _echo(s.port, aec="SOMEONEELSE")
    assert out.returncode != 0
    assert "Called AE Title Not Recognized" in out.stdout + out.stderr


def test_association_limit_rejects_transiently_and_frees_the_slot(scp: Any) -> None:
    s = scp(max_associations=1)
    first = _ae().associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert first.is_established
    second = rejection(s.port, associate_rq([(1, CTImageStorage, ImplicitVRLittleEndian)]))
    assert second == (2, 3, 2)  # transient, presentation, local limit
    first.release()
    wait_until(lambda: s.server.active_associations() == 0, 10, "slot freed")
    third = _ae().associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert third.is_established
    third.release()


def test_a_new_association_goes_to_the_less_busy_of_two_receivers(tmp_path: Path) -> None:
    """Two receivers (here two servers in one process) accept from one listening socket; each new association
    wakes both, and the one with an open connection holds back so the idle one takes it."""
    cfg = parse_config(node_config(tmp_path, node={"receivers": 2}, storage={"path": str(tmp_path / "data")}))
    ctx = ReceiveContext(cfg, open_spool(cfg), Store(cfg.db_path))
    listener = listen(cfg)
    settings = dataclasses.replace(acceptor_settings(cfg), yield_per_connection=0.25)  # roomy for a busy CI
    assert acceptor_settings(cfg).yield_per_connection > 0  # what serve gives each of its receivers
    servers = [UpperLayerServer(settings, ctx, capabilities(cfg), listener) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        for _ in range(3):  # without the hold-back, which server wins is a coin toss each time
            first = _ae().associate("127.0.0.1", port, ae_title="DICOMNODE")
            second = _ae().associate("127.0.0.1", port, ae_title="DICOMNODE")
            assert first.is_established and second.is_established
            assert sorted(server.active_associations() for server in servers) == [1, 1]
            first.release()
            second.release()
            wait_until(lambda: not any(server.active_associations() for server in servers), 10, "both released")
    finally:
        for server in servers:
            server.shutdown(grace=0.5)


def test_small_pdus_and_deflate_store_the_data_set_as_sent(scp: Any) -> None:
    """A 4 KiB receive limit forces each instance into ~130 PDUs; deflate must be stored still deflated."""
    s = scp(max_pdu_size=4096)
    files = sorted(series_dir("P01").iterdir())[:4]
    assoc = _ae(DeflatedExplicitVRLittleEndian).associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 4096
    assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files] == [0] * 4
    assoc.release()
    for src in files:
        original = pydicom.dcmread(src)
        (kept,) = [p for p in s.files() if p.stem == original.SOPInstanceUID]
        raw = kept.read_bytes()
        assert pydicom.dcmread(kept).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert original.PixelData not in raw  # stored as received: deflated
        copy = pydicom.dcmread(kept)
        assert copy.PixelData == original.PixelData and copy.SOPInstanceUID == original.SOPInstanceUID


def test_the_next_spool_file_is_made_between_instances_and_removed_at_release(scp: Any) -> None:
    s = scp()
    files = sorted(series_dir("P03").iterdir())[:3]
    series = s.cfg.spool_dir / str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assoc = _ae(ImplicitVRLittleEndian).associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files] == [0, 0, 0]
    wait_until(lambda: len(list(series.glob(".tmp-*.part"))) == 1, 10, "the spare file in the series folder")
    assert len(list(s.spool.scan())) == 3 and s.instances() == 3  # a spare is no instance
    assoc.release()
    wait_until(lambda: not [p for p in s.files() if p.suffix == ".part"], 10, "the spare removed")
    assert sorted(p.name for p in series.iterdir()) == sorted(f"{pydicom.dcmread(p).SOPInstanceUID}.dcm"
                                                              for p in files)


def test_an_instance_larger_than_the_write_chunk_is_stored_intact(scp: Any) -> None:
    (src,) = sorted(series_dir("P06").iterdir())  # enhanced MR, 3.4 MB in one object
    original = pydicom.dcmread(src)
    s = scp()
    assert s.send(original) == 0
    (kept,) = [p for p in s.files() if p.suffix == ".dcm"]
    copy = pydicom.dcmread(kept)
    assert kept.stem == original.SOPInstanceUID and s.instances() == 1
    assert copy.PixelData == original.PixelData and copy.NumberOfFrames == original.NumberOfFrames


def test_failure_statuses_carry_an_error_comment(scp: Any, tmp_path: Path) -> None:
    s = scp()
    src = pydicom.dcmread(next(series_dir("P03").iterdir()))
    del src.SeriesInstanceUID
    broken = tmp_path / "no_series.dcm"
    src.save_as(broken, enforce_file_format=True)
    assoc = _ae(str(src.file_meta.TransferSyntaxUID)).associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(broken)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    assert rsp.Status == 0xC000
    assert rsp.ErrorComment == "data set lacks SeriesInstanceUID"
    assert s.files() == [] and s.instances() == 0


def test_unserved_dimse_request_gets_unrecognized_operation_and_association_goes_on(scp: Any) -> None:
    s = scp()
    sock = _raw_associate(s.port, [(1, CTImageStorage, ImplicitVRLittleEndian)])
    with sock:
        # a C-FIND-RQ with an identifier, on the storage context: not served here
        sock.sendall(b"".join(pdata_pdus(1, _command(0x0020, 7, CTImageStorage, data=True), True, 0)))
        sock.sendall(b"".join(pdata_pdus(1, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", False, 0)))
        pdu_type, body = _read_pdu(sock)
        assert pdu_type == 0x04
        rsp = decode_command(body[6:])  # one PDV: 4 length + 1 context + 1 control
        assert struct.unpack("<H", rsp[0x00000100])[0] == 0x8020
        assert struct.unpack("<H", rsp[0x00000120])[0] == 7
        assert struct.unpack("<H", rsp[0x00000900])[0] == 0x0211
        # C-ECHO on the same association still works (echo on a storage context is answered too)
        sock.sendall(b"".join(pdata_pdus(1, _command(0x0030, 8, Verification), True, 0)))
        _, body = _read_pdu(sock)
        assert struct.unpack("<H", decode_command(body[6:])[0x00000900])[0] == 0
        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert _read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


@pytest.mark.parametrize("what", ["unknown-context", "unknown-pdu", "data-before-command", "second-associate-rq"])
def test_protocol_violations_abort_the_association_and_the_node_keeps_serving(scp: Any, what: str) -> None:
    s = scp()
    sock = _raw_associate(s.port, [(1, CTImageStorage, ImplicitVRLittleEndian)])
    with sock:
        if what == "unknown-context":
            sock.sendall(b"".join(pdata_pdus(3, _command(0x0030, 1, Verification), True, 0)))
        elif what == "unknown-pdu":
            sock.sendall(b"\x09\x00\x00\x00\x00\x02\x00\x00")
        elif what == "data-before-command":
            sock.sendall(b"".join(pdata_pdus(1, b"\x08\x00\x16\x00\x02\x00\x00\x001\x00", False, 0)))
        else:
            sock.sendall(b"\x01\x00\x00\x00\x00\x04\x00\x01\x00\x00")
        _assert_aborted_by_node(sock)
    assert _echo(s.port).returncode == 0


def test_peer_abort_in_the_middle_of_a_data_set_leaves_nothing(scp: Any) -> None:
    s = scp()
    path = next(series_dir("P01").iterdir())
    ds = pydicom.dcmread(path)
    sock = _raw_associate(s.port, [(1, CTImageStorage, ImplicitVRLittleEndian)])
    with sock:
        sock.sendall(b"".join(pdata_pdus(1, _command(0x0001, 1, CTImageStorage, ds.SOPInstanceUID, data=True),
                                         True, 0)))
        raw = path.read_bytes()
        sock.sendall(b"".join(pdata_pdus(1, raw[len(raw) // 2:], False, 16384)[:-1]))  # all but the last PDU
        wait_until(lambda: any((s.cfg.spool_dir / ".incoming").glob("*")), 10, "incoming file")
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT from the service user
    wait_until(lambda: not any((s.cfg.spool_dir / ".incoming").glob("*")), 10, "incoming file removed")
    assert s.files() == [] and s.instances() == 0
    assert _echo(s.port).returncode == 0


def test_silent_peers_are_dropped_after_the_timeouts(scp: Any) -> None:
    s = scp(acse_timeout=0.5, network_timeout=0.5)
    # ARTIM: a connection that never sends its A-ASSOCIATE-RQ
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as quiet:
        start = time.monotonic()
        assert quiet.recv(16) == b""
        assert time.monotonic() - start < 5
    # network timeout: an association that goes silent gets an A-ABORT (a local abort: service-user source),
    # then the connection is closed when the peer does not close it within ARTIM (Sta13)
    sock = _raw_associate(s.port, [(1, CTImageStorage, ImplicitVRLittleEndian)])
    with sock:
        start = time.monotonic()
        assert _read_pdu(sock) == (0x07, b"\x00\x00\x00\x00")
        assert time.monotonic() - start < 5
        wait_until(lambda: s.server.active_associations() == 0, 5, "slot freed at the abort")
        assert sock.recv(16) == b""
        assert time.monotonic() - start < 5


def test_rejected_presentation_contexts_are_named_and_accepted_ones_work(scp: Any) -> None:
    s = scp()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R FIND: not served
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == ["1.2.840.10008.5.1.4.1.2.2.1"]
    assoc.release()
