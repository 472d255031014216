"""Property-based fuzzing (hypothesis) of every parser the receiver runs on untrusted bytes: the PDU splitter,
the A-ASSOCIATE-RQ decoder (against pynetdicom's encoder and decoder as the reference codec), the DIMSE command
set codec, the header walker, and the PDV walker of a live association. Examples are bounded so the whole file
runs in well under a minute; a failure prints the smallest input hypothesis found."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.receive.acse import AssociateRequest, decode_associate_rq
from dicomnode.receive.dimse import encode_response, parse_command
from dicomnode.receive.header import HeaderError, read_header
from dicomnode.receive.negotiation import Acceptance, Capabilities, negotiate, other_service_in_dicom
from dicomnode.receive.pdu import MAX_ASSOCIATE_RQ, PduSplitter, ProtocolError, pdata_pdus
from dicomnode.receive.upper_layer import AcceptorSettings
from dicomnode.state.spool import is_valid_uid
from tests.conftest import series_dir
from tests.peers import wait_until
from tests.scp_peer import Scp, association_threads, command, raw_associate, read_pdu, status_of

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # ~80 ms each
UIDS = st.lists(st.integers(0, 10**8), min_size=2, max_size=9).map(lambda xs: ".".join(map(str, xs))).filter(
    lambda uid: len(uid) <= 64)
AES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), min_size=1,
              max_size=16)
SETTINGS = AcceptorSettings(ae_title="DICOMNODE", max_pdu=16384, implementation_uid="1.2.3.4",
                            implementation_version="FUZZ")
CAPS = Capabilities(sop_classes=frozenset({CTImageStorage, Verification}),
                    transfer_syntaxes=("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"),
                    is_other_service=other_service_in_dicom)


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


# ----------------------------------------------------------------------------------------------- PDU splitter


PDUS = st.lists(st.tuples(st.integers(1, 7), st.binary(max_size=300)), max_size=6)


@FAST
@given(PDUS, st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_the_splitter_finds_the_same_pdus_in_any_pieces(pdus: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(_pdu(t, b) for t, b in pdus)
    whole = PduSplitter(want_rq=True).feed(stream)
    splitter, pieces, i = PduSplitter(want_rq=True), [], 0
    for cut in cuts * (len(stream) // max(sum(cuts), 1) + 1):
        if i >= len(stream):
            break
        pieces.extend(splitter.feed(stream[i:i + cut]))
        i += cut
    pieces.extend(splitter.feed(stream[i:]))
    assert pieces == whole
    short = [(t, b) for t, b in pdus if t not in (2, 4) and len(b) <= 1024 or t in (2, 4)]
    if len(short) == len(pdus):  # no length over a short PDU's limit: every PDU is found, in order
        assert [(p.pdu_type, p.length) for p in whole] == [(t, len(b)) for t, b in pdus]
        assert [p.body for p in whole if p.pdu_type == 1] == [b for t, b in pdus if t == 1]


@FAST
@given(st.binary(max_size=2000))
def test_the_splitter_never_raises_and_never_holds_more_than_it_got(data: bytes) -> None:
    splitter = PduSplitter(want_rq=True)
    for pdu in splitter.feed(data):
        assert pdu.body is None or len(pdu.body) <= min(len(data), MAX_ASSOCIATE_RQ)
    assert splitter.wanted() >= 1 or splitter.broken
    assert len(splitter._body) <= len(data)


# ------------------------------------------------------------------------------------------ A-ASSOCIATE-RQ


@st.composite
def associate_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """An A-ASSOCIATE-RQ encoded by pynetdicom (the reference), and what it says."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    calling, called = draw(AES), draw(st.sampled_from(["DICOMNODE", "OTHER"]))
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    abstracts = draw(st.lists(st.one_of(UIDS, st.sampled_from([CTImageStorage, Verification])), min_size=1,
                              max_size=12))
    contexts = []
    for i, abstract in enumerate(abstracts):
        cx = build_context(abstract, draw(st.lists(UIDS | st.just(ImplicitVRLittleEndian), min_size=1,
                                                   max_size=4)))
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length, impl = MaximumLengthNotification(), ImplementationClassUIDNotification()
    max_length.maximum_length_received = draw(st.integers(0, 2**32 - 1))
    impl.implementation_class_uid = draw(UIDS)
    items: list[Any] = [max_length, impl]
    roles = draw(st.lists(st.tuples(st.sampled_from(abstracts), st.booleans(), st.booleans()).filter(
        lambda role: role[1] or role[2]), max_size=3))  # pynetdicom encodes no role item with neither role
    for uid, scu, scp in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = uid, scu, scp
        items.append(role)
    if draw(st.booleans()):
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = draw(st.integers(0, 65535))
        window.maximum_number_operations_performed = draw(st.integers(0, 65535))
        items.append(window)
    identity = draw(st.none() | st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=40),
                                          st.binary(min_size=1, max_size=40), st.booleans()))
    if identity is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type, item.primary_field = identity[0], identity[1]
        item.secondary_field = identity[2] if identity[0] == 2 else b""
        item.positive_response_requested = identity[3]
        items.append(item)
    primitive.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    said = {"calling": calling, "called": called, "abstracts": abstracts,
            "max_pdu": max_length.maximum_length_received, "roles": len(roles),
            "identity": identity}
    return bytes(pdu.encode()), said


def _check_acceptance(request: AssociateRequest) -> None:
    """negotiate() answers anything decodable, and pynetdicom reads its A-ASSOCIATE-AC."""
    verdict = negotiate(request, SETTINGS, CAPS)
    if isinstance(verdict, Acceptance):
        ac = A_ASSOCIATE_AC()
        ac.decode(verdict.ac_pdu)
        results = [item for item in ac.variable_items if item.item_type == 0x21]
        assert len(results) == len({cx.context_id for cx in request.contexts})
        for cid, (abstract, syntax) in verdict.contexts.items():
            assert is_valid_uid(abstract) and is_valid_uid(syntax) and cid % 2 == 1


@SLOWER
@given(associate_requests())
def test_requests_encoded_by_pynetdicom_decode_to_what_they_say(case: tuple[bytes, dict[str, object]]) -> None:
    raw, said = case
    request = decode_associate_rq(raw[6:])
    assert (request.calling_ae, request.called_ae) == (said["calling"], said["called"])
    assert [cx.abstract_syntax for cx in request.contexts] == said["abstracts"]
    assert request.max_pdu == said["max_pdu"] and len(request.roles) == said["roles"]
    identity = said["identity"]
    if identity is None:
        assert request.user_identity is None
    else:
        assert request.user_identity is not None
        assert (request.user_identity.kind, request.user_identity.primary) == identity[:2]  # type: ignore[index]
    _check_acceptance(request)


@SLOWER
@given(associate_requests(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                                      max_size=6), st.integers(0, 400))
def test_mutated_requests_raise_only_protocol_errors(case: tuple[bytes, dict[str, object]],
                                                     flips: list[tuple[int, int]], cut: int) -> None:
    body = bytearray(case[0][6:])
    for where, value in flips:
        body[where % len(body)] = value
    for candidate in (bytes(body), bytes(body[:max(0, len(body) - cut)])):
        try:
            request = decode_associate_rq(candidate)
        except ProtocolError:
            continue
        _check_acceptance(request)


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_are_no_request(data: bytes) -> None:
    try:
        _check_acceptance(decode_associate_rq(data))
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------------------ DIMSE commands


@FAST
@given(st.binary(max_size=400))
def test_random_command_sets_raise_only_protocol_errors(data: bytes) -> None:
    try:
        cmd = parse_command(data)
    except ProtocolError:
        return
    assert cmd.sop_class_uid is None or cmd.sop_class_uid == "" or is_valid_uid(cmd.sop_class_uid)


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), UIDS | st.binary(max_size=70), UIDS | st.binary(max_size=70),
       st.booleans())
def test_command_sets_decode_to_what_they_say(field: int, message_id: int, sop_class: str | bytes,
                                              sop_instance: str | bytes, data: bool) -> None:
    cmd = parse_command(command(field, message_id, sop_class, sop_instance, data=data))
    assert (cmd.command_field, cmd.message_id, cmd.has_data_set) == (field, message_id, data)
    if isinstance(sop_class, str):
        assert cmd.sop_class_uid == sop_class
    else:
        assert cmd.sop_class_uid is None or is_valid_uid(cmd.sop_class_uid)


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.text(max_size=70) | UIDS,
       st.text(max_size=70) | UIDS, st.text(max_size=100))
def test_any_response_encodes_and_pydicom_reads_it(field: int, message_id: int, status: int, sop_class: str,
                                                   sop_instance: str, comment: str) -> None:
    ds = decode(BytesIO(encode_response(field, message_id, status, sop_class, sop_instance, comment)), True, True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == ((field | 0x8000) & 0xFFFF, message_id,
                                                                        status)
    assert ds.get("AffectedSOPClassUID", "") == (sop_class if is_valid_uid(sop_class) else "")
    assert ds.get("AffectedSOPInstanceUID", "") == (sop_instance if is_valid_uid(sop_instance) else "")


# ------------------------------------------------------------------------------------------- header walker


def _real_data_set() -> tuple[bytes, str]:
    path = next(iter(sorted(series_dir("P01").iterdir())))
    raw = path.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length:][:6000], str(pydicom.dcmread(path, stop_before_pixels=True).file_meta
                                                .TransferSyntaxUID)


REAL = _real_data_set()


@FAST
@given(st.lists(st.tuples(st.integers(0, 5999), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**7), st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"]))
def test_the_header_walker_raises_only_header_errors(flips: list[tuple[int, int]], total: int, syntax: str) -> None:
    data = bytearray(REAL[0])
    for where, value in flips:
        data[where] = value
    for size in (len(data), total):
        try:
            header = read_header(bytes(data), size, syntax)
        except HeaderError:
            continue
        assert header.pixel_available >= 0


# -------------------------------------------------------------------------------- PDVs on a live association


PDV = st.tuples(st.sampled_from([1, 3, 5]), st.integers(0, 3), st.binary(max_size=120))


@pytest.fixture(scope="module")
def live_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scp]:
    s = Scp(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.server.shutdown(grace=0.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(PDV, min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_pdvs_get_an_answer_or_an_abort_and_the_node_goes_on(live_scp: Scp, pdus: list[list[tuple[
        int, int, bytes]]]) -> None:
    s = live_scp
    port = s.port
    with raw_associate(port, [(1, CTImageStorage, ImplicitVRLittleEndian), (3, Verification,
                                                                             ImplicitVRLittleEndian)]) as sock:
        for pdvs in pdus:
            body = b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs)
            sock.sendall(_pdu(4, body))
        sock.sendall(_pdu(5, b"\x00\x00\x00\x00"))
        sock.settimeout(5)
        while True:  # responses, then A-RELEASE-RP or A-ABORT: the node never goes silent
            pdu_type, _ = read_pdu(sock)
            if pdu_type in (6, 7):
                break
            assert pdu_type == 4
    with raw_associate(port, [(3, Verification, ImplicitVRLittleEndian)]) as sock:
        sock.sendall(b"".join(pdata_pdus(3, command(0x0030, 1, Verification), True, 0)))
        assert status_of(read_pdu(sock)[1]) == 0
    wait_until(lambda: not association_threads(), 5, "association threads end")
    assert s.temporary_files() == []
