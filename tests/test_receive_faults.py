"""Faults found by probing the receiver (issue 16), each reproduced as it was found: crafted command sets and
data sets on a raw association, pydicom's own test files, descriptor counts, and what goes back to the peer and
to the log. The SCP runs in this process, as a receiver process runs it."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.receive.pdu import pdata_pdus
from dicomnode.state.spool import is_valid_uid
from tests.conftest import series_dir
from tests.peers import wait_until
from tests.scp_peer import (
    Scp,
    associate_rq,
    association_threads,
    command,
    open_descriptors,
    raw_associate,
    read_pdu,
    status_of,
)

CT_CONTEXT = [(1, CTImageStorage, ImplicitVRLittleEndian), (3, Verification, ImplicitVRLittleEndian)]



def _implicit(ds: pydicom.Dataset) -> bytes:
    """``ds`` encoded as on the wire of an implicit VR little endian context."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buf, ds)
    return bytes(buf.getvalue())


def _ct(**replace: str) -> tuple[pydicom.Dataset, bytes]:
    """A real CT slice encoded implicit VR LE, with values swapped byte for byte (first occurrence only)."""
    ds = pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir()))))
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.7"
    raw = _implicit(ds)
    for old, new in replace.items():
        assert len(old) == len(new) and old.encode() in raw
        raw = raw.replace(old.encode(), new.encode("latin-1"), 1)
    return ds, raw


def _with_newline(uid: str) -> str:
    """``uid`` one digit shorter plus a final newline: the same length, valid but for the newline."""
    i = next(i for i in range(len(uid) - 1) if uid[i].isdigit() and uid[i + 1].isdigit())
    return uid[:i] + uid[i + 1:] + "\n"


def _store(sock: socket.socket, sop_class: str | bytes, sop_instance: str | bytes, data: bytes,
           context: int = 1) -> tuple[int, bytes]:
    """Send one C-STORE-RQ and its data set; the PDU that comes back (type, body)."""
    sock.sendall(b"".join(pdata_pdus(context, command(0x0001, 5, sop_class, sop_instance, data=True), True, 0)))
    sock.sendall(b"".join(pdata_pdus(context, data, False, 16384)))
    return read_pdu(sock)


def _release(sock: socket.socket) -> None:
    sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert read_pdu(sock)[0] == 0x06


def _idle(s: Scp) -> None:
    wait_until(lambda: not association_threads() and s.server.active_associations() == 0, 10, "associations end")


def test_fault1_non_ascii_sop_class_leaks_no_descriptor_and_no_temporary_file(scp: Any) -> None:
    s = scp()
    ds, raw = _ct()
    before = len(open_descriptors())
    for _ in range(20):
        with raw_associate(s.port, CT_CONTEXT) as sock:
            try:
                _store(sock, CTImageStorage.encode() + b"\xff", ds.SOPInstanceUID, raw)
            except OSError:
                pass  # the fault aborted the association; what it left behind is the point
    _idle(s)
    assert s.temporary_files() == []
    assert not [d for d in open_descriptors() if str(s.cfg.spool_dir) in d]
    assert len(open_descriptors()) <= before + 2  # logging or pytest may open one; 20 leaks would show
    assert s.instances() == 0


@pytest.mark.parametrize("where", ["sop-class", "sop-instance"])
def test_fault2_non_ascii_uids_get_a_dimse_failure_and_the_association_goes_on(scp: Any, where: str) -> None:
    s = scp()
    ds, raw = _ct()
    sop_class: bytes = CTImageStorage.encode() + (b"\xe9" if where == "sop-class" else b"")
    sop_instance: bytes = ds.SOPInstanceUID.encode() + (b"\xe9" if where == "sop-instance" else b"")
    with raw_associate(s.port, CT_CONTEXT) as sock:
        pdu_type, body = _store(sock, sop_class, sop_instance, raw)
        assert pdu_type == 0x04, "a DIMSE response, not an A-ABORT"
        assert status_of(body) == 0xC000
        # C-ECHO with a non-ASCII Affected SOP Class UID: a DIMSE failure too (mistyped argument)
        sock.sendall(b"".join(pdata_pdus(3, command(0x0030, 6, Verification.encode() + b"\xff"), True, 0)))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04 and status_of(body) == 0x0212
        # the association still serves: the same instance, well formed, is stored
        pdu_type, body = _store(sock, CTImageStorage, ds.SOPInstanceUID, raw)
        assert pdu_type == 0x04 and status_of(body) == 0x0000
        _release(sock)
    _idle(s)
    assert s.instances() == 1 and s.temporary_files() == []


def test_fault4_uids_are_matched_whole() -> None:
    assert is_valid_uid("1.2.840.10008.1.2")
    for bad in ("1.2.3\n", "1.2.3\n4", "\n1.2.3", "1.2.3 ", "", "1..2", "1.2.", "x" * 3, "1" * 65):
        assert not is_valid_uid(bad), repr(bad)


@pytest.mark.parametrize("path", ["command-set", "data-set", "file-meta"])
def test_fault4_a_uid_ending_in_a_newline_is_refused_on_every_path(scp: Any, path: str) -> None:
    """command set: the Affected SOP Instance UID; data set: the Series Instance UID; file meta: the Affected
    SOP Class UID, which becomes the stored file's Media Storage SOP Class UID. The data set agrees with its
    command each time, so only the UID check can refuse it."""
    s = scp()
    sop_class, sop_instance = CTImageStorage, "1.2.826.0.1.3680043.10.1.7"
    if path == "command-set":
        ds, raw = _ct(**{sop_instance: _with_newline(sop_instance)})
        sop_instance = _with_newline(sop_instance)
    elif path == "data-set":
        series = str(pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir())))).SeriesInstanceUID)
        ds, raw = _ct(**{series: _with_newline(series)})
    else:
        ds, raw = _ct(**{sop_class + "\x00": _with_newline(sop_class) + "\x00"})
        sop_class = _with_newline(sop_class)
    with raw_associate(s.port, CT_CONTEXT) as sock:
        pdu_type, body = _store(sock, sop_class, sop_instance, raw)
        assert pdu_type == 0x04 and status_of(body) == 0xC000
        _release(sock)
    _idle(s)
    assert s.instances() == 0 and s.files() == []
    assert [p.name for p in s.cfg.spool_dir.iterdir() if "\n" in p.name] == []


def test_fault8_uncompressed_ybr_full_422_is_stored(scp: Any) -> None:
    path = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    assert path is not None
    original = pydicom.dcmread(path)
    assert original.PhotometricInterpretation == "YBR_FULL_422" and len(original.PixelData) == 100 * 100 * 2
    s = scp()
    assert s.send(original) == 0x0000
    (kept,) = [p for p in s.files() if p.suffix == ".dcm"]
    assert pydicom.dcmread(kept).PixelData == original.PixelData


def test_fault8_a_truncated_ybr_full_422_image_is_still_refused(scp: Any) -> None:
    path = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    assert path is not None
    original = pydicom.dcmread(path)
    original.PixelData = original.PixelData[:-200]
    s = scp()
    assert s.send(original) == 0xA900


def test_fault9_association_threads_leave_no_state_store_connection_open(scp: Any) -> None:
    s = scp()
    db = s.cfg.db_path.name
    files = sorted(series_dir("P03").iterdir())[:12]
    before = [d for d in open_descriptors() if db in d]
    for path in files:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assoc.release()
    _idle(s)
    assert s.instances() == 12
    assert len([d for d in open_descriptors() if db in d]) <= len(before) + 3  # this thread's own connection


def test_fault10_out_of_space_comment_names_no_path(tmp_path: Path, caplog: Any) -> None:
    s = Scp(tmp_path, storage={"min_free_mb": 10**9})  # more free space than any disk has
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
        with caplog.at_level(logging.ERROR, logger="dicomnode"):
            rsp = assoc.send_c_store(pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir())))))
        assoc.release()
    finally:
        s.server.shutdown(grace=0.5)
    assert rsp.Status == 0xA700
    assert "out of space" in rsp.ErrorComment and "/" not in rsp.ErrorComment
    assert str(s.cfg.spool_dir) in caplog.text  # the operator still learns where


def test_fault10_malformed_associate_requests_log_one_line_per_peer(scp: Any, caplog: Any) -> None:
    s = scp()
    good = associate_rq(CT_CONTEXT)
    # an item that claims more bytes than the PDU holds: the request cannot be decoded
    body = good[6:] + b"\x20\x00\xff\xff" + "\u00c4".encode("latin-1") * 8
    bad = struct.pack(">BxL", 1, len(body)) + body
    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(bad)
                assert read_pdu(sock)[0] == 0x07  # A-ABORT
        _idle(s)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a malformed request"
    assert not [r for r in loud if r.levelno >= logging.ERROR]
    assert len([r for r in loud if "127.0.0.1" in r.getMessage()]) == 1, [r.getMessage() for r in loud]


def test_a_non_ascii_abstract_syntax_rejects_its_context_only(scp: Any, caplog: Any) -> None:
    s = scp()
    good = associate_rq(CT_CONTEXT)
    bad = good.replace(CTImageStorage.encode(), CTImageStorage[:-1].encode() + b"\xc4")
    with caplog.at_level(logging.DEBUG), socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        sock.sendall(bad)
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x02
        results = {body[i + 4]: body[i + 6] for i in range(68, len(body) - 4) if body[i] == 0x21 and
                   body[i + 5] == 0}  # presentation context results: id -> result
        assert results.get(1) == 3 and results.get(3) == 0  # abstract syntax not supported; Verification
        _release(sock)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
