"""Conformance of the receiver's upper layer with pynetdicom's SCU as the reference peer: maximum PDU sizes from
4 KiB to unlimited, many presentation contexts, SCP/SCU role selection, the asynchronous operations window,
SOP Class (Common) Extended Negotiation, User Identity negotiation, and storage SOP classes the node does not
know. The SCP runs in this process, as a receiver process runs it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from tests.conftest import series_dir
from tests.peers import node_config
from tests.scp_peer import Scp, associate_rq, rejection
from tests.test_receive import _dataset_bytes

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.1.16"  # no registry knows it: a modality's private object
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Any]:
    started: list[Scp] = []

    def make(**node: Any) -> Scp:
        s = Scp(tmp_path / f"scp{len(started)}", **node)
        started.append(s)
        return s

    yield make
    for s in started:
        s.server.shutdown(grace=0.5)


def _ae(max_pdu: int = 16382) -> AE:
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    return ae


def _ct(n: int = 2) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(series_dir("P03").iterdir())[:n]]


@pytest.mark.parametrize("ours", [4096, 0], ids=["node-4KiB", "node-unlimited"])
@pytest.mark.parametrize("theirs", [4096, 16382, 65536, 1 << 20, 0],
                         ids=["peer-4KiB", "peer-16KiB", "peer-64KiB", "peer-1MiB", "peer-unlimited"])
def test_maximum_pdu_sizes(scp: Any, ours: int, theirs: int) -> None:
    s = scp(max_pdu_size=ours)
    ae = _ae(theirs)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == ours
    datasets = _ct()
    assert [assoc.send_c_store(ds).Status for ds in datasets] + [assoc.send_c_echo().Status] == [0, 0, 0]
    assoc.release()
    for ds in datasets:
        (kept,) = [p for p in s.files() if p.stem == ds.SOPInstanceUID]
        assert pydicom.dcmread(kept).PixelData == ds.PixelData


def test_many_presentation_contexts(scp: Any) -> None:
    s = scp()
    ae = _ae()
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:126] + [STUDY_ROOT_FIND]
    for uid in classes:
        ae.add_requested_context(uid, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assert len(ae.requested_contexts) == 128  # the most PS3.8 allows (odd IDs 1-255)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert len(assoc.accepted_contexts) == 127
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [STUDY_ROOT_FIND]
    assert {cx.transfer_syntax[0] for cx in assoc.accepted_contexts} == {ImplicitVRLittleEndian}
    assert assoc.send_c_store(_ct(1)[0]).Status == 0
    assoc.release()


def test_role_selection(scp: Any) -> None:
    s = scp()
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ExplicitVRLittleEndian)  # MR: the peer wants SCP only
    ae.add_requested_context(Verification)
    roles: list[Any] = [build_role(CTImageStorage, scu_role=True, scp_role=True),
             build_role("1.2.840.10008.5.1.4.1.1.4", scu_role=False, scp_role=True)]
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE", ext_neg=roles)
    assert assoc.is_established
    (ct,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
    assert (ct.as_scu, ct.as_scp) == (True, False)  # the requestor may send, never receive, on this context
    assert "1.2.840.10008.5.1.4.1.1.4" in [cx.abstract_syntax for cx in assoc.rejected_contexts]
    reply = assoc.acceptor.role_selection[CTImageStorage]
    assert (reply.scu_role, reply.scp_role) == (True, False)
    assert assoc.send_c_store(_ct(1)[0]).Status == 0
    assoc.release()


def test_asynchronous_operations_window_and_extended_negotiation(scp: Any) -> None:
    s = scp()
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked, window.maximum_number_operations_performed = 5, 5
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = CTImageStorage
    extended.service_class_application_information = b"\x02\x00\x00\x00\x01\x00"  # storage: level 2, coercion
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid, common.service_class_uid = CTImageStorage, "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE", ext_neg=[window, extended, common])
    assert assoc.is_established
    assert assoc.acceptor.asynchronous_operations == (1, 1)  # one operation at a time
    assert assoc.acceptor.sop_class_extended == {}  # not supported: no answer, and the association goes on
    assert [assoc.send_c_store(ds).Status for ds in _ct()] == [0, 0]
    assoc.release()


def _identity(kind: int, user: bytes, passcode: bytes = b"", positive: bool = True) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type, item.primary_field = kind, user
    item.secondary_field = passcode
    item.positive_response_requested = positive
    return item


USERS = {"required": True, "users": [{"username": "ct-scanner", "passcode": "s3cret"}, {"username": "pacs"}]}


@pytest.mark.parametrize(("identity", "established", "response"), [
    (_identity(2, b"ct-scanner", b"s3cret"), True, True),
    (_identity(2, b"ct-scanner", b"s3cret", positive=False), True, False),
    (_identity(1, b"pacs"), True, True),  # a user configured without passcode: the username suffices
    (_identity(2, b"ct-scanner", b"wrong"), False, False),
    (_identity(1, b"ct-scanner"), False, False),  # its passcode is required
    (_identity(1, b"nobody"), False, False),
    (None, False, False),  # required
], ids=["passcode", "no-response-asked", "username", "wrong-passcode", "no-passcode", "unknown-user", "none"])
def test_user_identity(scp: Any, identity: UserIdentityNegotiation | None, established: bool,
                       response: bool) -> None:
    s = scp(user_identity=USERS)
    if not established:  # checked on the wire: see tests.scp_peer.rejection
        rq = associate_rq([(1, Verification, ImplicitVRLittleEndian)], extra=[identity] if identity else [])
        assert rejection(s.port, rq) == (1, 1, 1)  # rejected-permanent, service user, no reason given
        return
    ae = _ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE", ext_neg=[identity] if identity else [])
    assert assoc.is_established
    answer = assoc.acceptor.user_identity
    assert (answer is not None) is response
    if answer is not None:
        assert answer.server_response == b""  # PS3.7 D.3.3.7.2: empty for username (and passcode)
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_user_identity_is_optional_unless_required(scp: Any) -> None:
    s = scp(user_identity={"users": USERS["users"]})
    ae = _ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established and assoc.acceptor.user_identity is None
    assoc.release()
    wrong = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE", ext_neg=[_identity(2, b"pacs", b"x")])
    assert wrong.is_established  # pacs has no passcode configured: its username suffices
    wrong.release()


def _private_object() -> pydicom.Dataset:
    ds = _ct(1)[0]
    ds.SOPClassUID = UID(PRIVATE_SOP_CLASS)
    ds.file_meta.MediaStorageSOPClassUID = UID(PRIVATE_SOP_CLASS)
    ds.add_new(0x00291010, "OB", b"\x01\x02private payload\x00")
    return ds


def test_unknown_storage_sop_classes_are_stored_as_sent(scp: Any, tmp_path: Path) -> None:
    s = scp()
    ds = _private_object()
    sent = tmp_path / "private.dcm"
    ds.save_as(sent, enforce_file_format=True)
    ae = _ae()
    ae.add_requested_context(PRIVATE_SOP_CLASS, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.201.1")  # Inventory Storage: newer than pynetdicom's list
    ae.add_requested_context(STUDY_ROOT_FIND)  # registered, and not storage
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert sorted(str(cx.abstract_syntax) for cx in assoc.accepted_contexts) == sorted(
        [PRIVATE_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.201.1"])
    assert assoc.send_c_store(sent).Status == 0
    assoc.release()
    (kept,) = [p for p in s.files() if p.suffix == ".dcm"]
    assert _dataset_bytes(kept) == _dataset_bytes(sent)  # the data set exactly as sent
    assert pydicom.dcmread(kept).file_meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS
    (series,) = s.store.list_series()
    assert series.sop_class_uid == PRIVATE_SOP_CLASS


def test_unknown_storage_sop_classes_can_be_refused(scp: Any) -> None:
    s = scp(accept_unknown_sop_classes=False)
    ae = _ae()
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [PRIVATE_SOP_CLASS]
    assoc.release()


def test_an_instance_stored_again_under_another_series_replaces_it_with_a_warning(scp: Any, caplog: Any) -> None:
    s = scp()
    first = _ct(1)[0]
    second = pydicom.dcmread(sorted(series_dir("P03").iterdir())[0])
    second.SeriesInstanceUID = generate_uid()
    ae = _ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assoc = ae.associate("127.0.0.1", s.port, ae_title="DICOMNODE")
        assert [assoc.send_c_store(ds).Status for ds in (first, second)] == [0, 0]
        assoc.release()
    (kept,) = [p for p in s.files() if p.suffix == ".dcm"]
    assert kept.parent.name == second.SeriesInstanceUID  # the replace rule: the last copy stands, counted once
    assert s.instances() == 1
    (warning,) = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert first.SeriesInstanceUID in warning and second.SeriesInstanceUID in warning


@pytest.mark.parametrize(("identity", "message"), [
    ({"required": True}, "needs at least one entry"),
    ({"users": [{"username": "a"}, {"username": "a"}]}, "duplicate username"),
    ({"users": [{"username": ""}]}, "must be 1-65535 bytes"),
])
def test_user_identity_config_is_checked_at_start_up(tmp_path: Path, identity: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(node_config(tmp_path, node={"user_identity": identity}))
