"""DIMSE command sets (PS3.7 E.1: group 0000, implicit VR little endian), decoded from untrusted bytes and
encoded for the responses this node sends.

:func:`parse_command` never trusts a value: a malformed command set raises :class:`ProtocolError` (the
association is aborted), while a UID that is not a valid UID (non-ASCII bytes, a final newline) is reported as
``None`` so the request gets a DIMSE failure status instead. :func:`encode_response` cannot fail on anything
a peer sent: it echoes only valid UIDs and writes the Error Comment in ASCII.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

from dicomnode.receive.pdu import ABORT_INVALID_PARAMETER, ProtocolError
from dicomnode.state.spool import is_valid_uid

# DIMSE command fields (PS3.7 E.1) and the statuses this layer answers by itself
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
SUCCESS, UNRECOGNIZED_OPERATION, MISTYPED_ARGUMENT, CANNOT_UNDERSTAND = 0x0000, 0x0211, 0x0212, 0xC000
VERIFICATION = "1.2.840.10008.1.1"

MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes; more is a broken or hostile peer
_ELEMENT = struct.Struct("<HHL")

TAG_AFFECTED_SOP_CLASS, TAG_COMMAND_FIELD, TAG_MESSAGE_ID = 0x00000002, 0x00000100, 0x00000110
TAG_PRIORITY, TAG_DATA_SET_TYPE, TAG_AFFECTED_SOP_INSTANCE = 0x00000700, 0x00000800, 0x00001000
TAG_MOVE_ORIGINATOR_AET = 0x00001030


@dataclass(frozen=True)
class Command:
    """A decoded DIMSE request. UIDs: "" when absent, None when present but not a valid UID."""

    command_field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str | None
    sop_instance_uid: str | None
    priority: int = 0
    move_originator_aet: str = ""

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & 0x8000)


def decode_command(raw: bytes | bytearray) -> dict[int, bytes]:
    """Elements of a command set by tag ``(group << 16) | element``; raises ProtocolError when malformed."""
    out: dict[int, bytes] = {}
    i, end = 0, len(raw)
    while i < end:
        if i + 8 > end:
            raise ProtocolError("command set ends inside an element header", ABORT_INVALID_PARAMETER)
        group, elem, length = _ELEMENT.unpack_from(raw, i)
        i += 8
        if group != 0x0000 or length == 0xFFFFFFFF or i + length > end:
            raise ProtocolError(f"malformed command set element ({group:04X},{elem:04X})", ABORT_INVALID_PARAMETER)
        out[(group << 16) | elem] = bytes(raw[i:i + length])
        i += length
    return out


def parse_command(raw: bytes | bytearray) -> Command:
    """A request's command set; ProtocolError when it is malformed or lacks Command Field / Message ID (a
    response's Message ID may be absent: it is ignored anyway)."""
    elements = decode_command(raw)
    field = _us(elements, TAG_COMMAND_FIELD)
    return Command(
        command_field=field,
        message_id=_us(elements, TAG_MESSAGE_ID, 0 if field & 0x8000 else None),
        has_data_set=_us(elements, TAG_DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET,
        sop_class_uid=_uid(elements, TAG_AFFECTED_SOP_CLASS),
        sop_instance_uid=_uid(elements, TAG_AFFECTED_SOP_INSTANCE),
        priority=_us(elements, TAG_PRIORITY, 0),
        move_originator_aet=_text(elements, TAG_MOVE_ORIGINATOR_AET))


def _us(elements: dict[int, bytes], tag: int, default: int | None = None) -> int:
    value = elements.get(tag)
    if value is None or len(value) != 2:
        if default is None:
            raise ProtocolError(f"command set lacks ({tag >> 16:04X},{tag & 0xFFFF:04X})", ABORT_INVALID_PARAMETER)
        return default
    return cast(int, struct.unpack("<H", value)[0])


def _text(elements: dict[int, bytes], tag: int) -> str:
    raw = elements.get(tag, b"").rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in raw)


def _uid(elements: dict[int, bytes], tag: int) -> str | None:
    raw = elements.get(tag)
    if raw is None:
        return ""
    text = raw.rstrip(b"\x00").decode("ascii", "replace")  # UI is padded with one NUL; nothing else is trimmed
    return text if is_valid_uid(text) else None


def _pad_uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _pad_text(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _element(group: int, elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(group, elem, len(value)) + value


def _pack_us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_response(command_field: int, message_id: int, status: int, sop_class_uid: str | None = "",
                    sop_instance_uid: str | None = "", comment: str = "") -> bytes:
    """A DIMSE-C response command set (implicit VR little endian, group 0000, tags ascending).

    The Affected SOP Class/Instance UIDs are optional in a response (PS3.7 9.3): one that is absent or not a
    valid UID is left out rather than echoed, so whatever a peer sent, encoding its response cannot fail. The
    Error Comment (at most 64 characters, LO) goes only with a status other than Success.
    """
    body = b""
    if sop_class_uid and is_valid_uid(sop_class_uid):
        body += _element(0x0000, 0x0002, _pad_uid(sop_class_uid))
    body += _element(0x0000, 0x0100, _pack_us((command_field | 0x8000) & 0xFFFF))
    body += _element(0x0000, 0x0120, _pack_us(message_id))
    body += _element(0x0000, 0x0800, _pack_us(NO_DATA_SET))
    body += _element(0x0000, 0x0900, _pack_us(status))
    if comment and status != SUCCESS:
        body += _element(0x0000, 0x0902, _pad_text(comment[:64]))
    if sop_instance_uid and is_valid_uid(sop_instance_uid):
        body += _element(0x0000, 0x1000, _pad_uid(sop_instance_uid))
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body
