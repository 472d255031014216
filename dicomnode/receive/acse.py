"""A-ASSOCIATE-RQ decoding and A-ASSOCIATE-AC encoding (PS3.8 9.3.2-9.3.3, PS3.7 Annex D.3.3), from and to
untrusted bytes, with nothing but the standard library.

The decoder checks every length against what is left before it slices, decodes text as ASCII with
replacement (a non-ASCII AE title or UID never raises) and keeps a UID exactly as sent (less one trailing NUL,
which some implementations add) so the negotiation can refuse an invalid one. Items of a type PS3.8 does not
define are skipped. Any structural fault raises :class:`~dicomnode.receive.pdu.ProtocolError`; nothing is
logged here (the connection loop logs one line per peer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dicomnode.receive.pdu import ABORT_INVALID_PARAMETER, ASSOCIATE_AC, PDU_HEADER, ProtocolError

_ITEM = struct.Struct(">BxH")
_FIXED = 68  # protocol version, reserved, called AE, calling AE, reserved: PS3.8 Table 9-11


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class RoleProposal:
    """SCP/SCU Role Selection (PS3.7 D.3.3.4): the roles the requestor proposes for itself."""

    sop_class_uid: str
    scu: bool
    scp: bool


@dataclass(frozen=True)
class UserIdentity:
    """User Identity Negotiation (PS3.7 D.3.3.7): 1 username, 2 username and passcode, 3 Kerberos, 4 SAML,
    5 JWT. ``primary``/``secondary`` are the raw fields."""

    kind: int
    positive_response_requested: bool
    primary: bytes
    secondary: bytes


@dataclass(frozen=True)
class AssociateRequest:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int = 0  # the requestor's maximum receive length; 0 = unlimited
    implementation_uid: str = ""
    implementation_version: str = ""
    async_window: tuple[int, int] | None = None  # (invoked, performed) when the item was sent
    roles: tuple[RoleProposal, ...] = ()
    extended: tuple[tuple[str, bytes], ...] = ()  # SOP Class Extended Negotiation: (SOP class, its info)
    common_extended: tuple[tuple[str, str], ...] = ()  # SOP Class Common Extended: (SOP class, service class)
    user_identity: UserIdentity | None = None
    raw_fixed: bytes = b""  # the request's fixed fields, echoed in the A-ASSOCIATE-AC as PS3.8 asks


def _text(raw: bytes) -> str:
    text = raw.decode("ascii", "replace")
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


def _uid(raw: bytes) -> str:
    return _text(raw[:-1] if raw.endswith(b"\x00") else raw)


def _items(data: bytes, start: int, end: int, where: str) -> list[tuple[int, bytes]]:
    """The (type, value) items between ``start`` and ``end``; ProtocolError when one does not fit."""
    out, i = [], start
    while i < end:
        if i + 4 > end:
            raise ProtocolError(f"{where}: item header cut short", ABORT_INVALID_PARAMETER)
        item_type, length = _ITEM.unpack_from(data, i)
        if i + 4 + length > end:
            raise ProtocolError(f"{where}: item 0x{item_type:02X} runs past its end", ABORT_INVALID_PARAMETER)
        out.append((item_type, data[i + 4:i + 4 + length]))
        i += 4 + length
    return out


def _field(value: bytes, offset: int, where: str) -> tuple[bytes, int]:
    """A 2-byte length and the field after it, at ``offset``; returns (field, offset after it)."""
    if offset + 2 > len(value):
        raise ProtocolError(f"{where}: length cut short", ABORT_INVALID_PARAMETER)
    (length,) = struct.unpack_from(">H", value, offset)
    if offset + 2 + length > len(value):
        raise ProtocolError(f"{where}: field runs past its item", ABORT_INVALID_PARAMETER)
    return value[offset + 2:offset + 2 + length], offset + 2 + length


def _context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError("presentation context item too short", ABORT_INVALID_PARAMETER)
    if value[0] % 2 == 0:  # PS3.8 9.3.2.2: odd integers between 1 and 255
        raise ProtocolError(f"presentation context ID {value[0]} is not odd", ABORT_INVALID_PARAMETER)
    abstract: list[str] = []
    syntaxes: list[str] = []
    for sub_type, sub in _items(value, 4, len(value), "presentation context"):
        if sub_type == 0x30:
            abstract.append(_uid(sub))
        elif sub_type == 0x40:
            syntaxes.append(_uid(sub))
    if len(abstract) != 1 or not syntaxes:
        raise ProtocolError("presentation context needs one abstract syntax and a transfer syntax",
                            ABORT_INVALID_PARAMETER)
    return ProposedContext(value[0], abstract[0], tuple(syntaxes))


@dataclass
class _UserInformation:
    """The user information sub-items as they are read (PS3.8 9.3.2.3, PS3.7 D.3.3)."""

    max_pdu: int = 0
    implementation_uid: str = ""
    implementation_version: str = ""
    async_window: tuple[int, int] | None = None
    roles: list[RoleProposal] = field(default_factory=list)
    extended: list[tuple[str, bytes]] = field(default_factory=list)
    common_extended: list[tuple[str, str]] = field(default_factory=list)
    user_identity: UserIdentity | None = None

    def read(self, sub_type: int, sub: bytes) -> None:
        if sub_type == 0x51 and len(sub) == 4:
            self.max_pdu = int(struct.unpack(">L", sub)[0])
        elif sub_type == 0x52:
            self.implementation_uid = _uid(sub)
        elif sub_type == 0x55:
            self.implementation_version = _text(sub[:16]).strip()
        elif sub_type == 0x53 and len(sub) == 4:
            invoked, performed = struct.unpack(">HH", sub)
            self.async_window = (int(invoked), int(performed))
        elif sub_type == 0x54:
            uid, at = _field(sub, 0, "role selection")
            if at + 2 > len(sub):
                raise ProtocolError("role selection item cut short", ABORT_INVALID_PARAMETER)
            self.roles.append(RoleProposal(_uid(uid), bool(sub[at]), bool(sub[at + 1])))
        elif sub_type == 0x56:
            uid, at = _field(sub, 0, "SOP class extended negotiation")
            self.extended.append((_uid(uid), bytes(sub[at:])))
        elif sub_type == 0x57:
            uid, at = _field(sub, 0, "SOP class common extended negotiation")
            service, at = _field(sub, at, "SOP class common extended negotiation")
            self.common_extended.append((_uid(uid), _uid(service)))
        elif sub_type == 0x58:
            self.user_identity = _user_identity(sub)


def _user_identity(sub: bytes) -> UserIdentity:
    if len(sub) < 2:
        raise ProtocolError("user identity item cut short", ABORT_INVALID_PARAMETER)
    primary, at = _field(sub, 2, "user identity")
    secondary = _field(sub, at, "user identity")[0] if at < len(sub) else b""
    return UserIdentity(sub[0], sub[1] == 1, bytes(primary), bytes(secondary))


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """The A-ASSOCIATE-RQ whose PDU body (after the 6-byte PDU header) is ``body``."""
    if len(body) < _FIXED:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields",
                            ABORT_INVALID_PARAMETER)
    (version,) = struct.unpack_from(">H", body, 0)
    application: list[str] = []
    contexts: list[ProposedContext] = []
    users: list[_UserInformation] = []
    for item_type, value in _items(body, _FIXED, len(body), "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            application.append(_uid(value))
        elif item_type == 0x20:
            contexts.append(_context(value))
        elif item_type == 0x50:
            users.append(_UserInformation())
            for sub_type, sub in _items(value, 0, len(value), "user information"):
                users[-1].read(sub_type, sub)
    if len(application) != 1 or len(users) != 1 or not contexts:
        raise ProtocolError("A-ASSOCIATE-RQ needs one application context, presentation contexts and one"
                            " user information item", ABORT_INVALID_PARAMETER)
    info = users[0]
    return AssociateRequest(
        protocol_version=version, called_ae=_text(body[4:20]).strip(), calling_ae=_text(body[20:36]).strip(),
        application_context=application[0], contexts=tuple(contexts), max_pdu=info.max_pdu,
        implementation_uid=info.implementation_uid, implementation_version=info.implementation_version,
        async_window=info.async_window, roles=tuple(info.roles), extended=tuple(info.extended),
        common_extended=tuple(info.common_extended), user_identity=info.user_identity,
        raw_fixed=bytes(body[:_FIXED]))


# ------------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class ContextResult:
    """The answer to one proposed presentation context (PS3.8 9.3.3.2): result 0 acceptance, 1 user
    rejection, 2 no reason (provider rejection), 3 abstract syntax not supported, 4 transfer syntaxes not
    supported; ``transfer_syntax`` is the accepted one (not significant when rejected)."""

    context_id: int
    result: int
    transfer_syntax: str
    abstract_syntax: str = ""


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def _with_length(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def encode_associate_ac(request: AssociateRequest, results: list[ContextResult], *, max_pdu: int,
                        implementation_uid: str, implementation_version: str,
                        roles: list[tuple[str, bool, bool]], identity_response: bytes | None) -> bytes:
    """The A-ASSOCIATE-AC PDU answering ``request``: one result per proposed context, our maximum receive
    length, implementation class and version, the asynchronous operations window (1, 1: this acceptor performs
    one operation at a time) when it was asked for, ``roles`` replies (SOP class, SCU, SCP) and a User Identity
    server response when ``identity_response`` is not None."""
    fixed = b"\x00\x01\x00\x00" + request.raw_fixed[4:68]
    items = _item(0x10, request.application_context.encode("ascii"))
    for cx in results:
        syntax = cx.transfer_syntax.encode("ascii", "replace")
        items += _item(0x21, bytes((cx.context_id, 0, cx.result, 0)) + _item(0x40, syntax))
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, implementation_uid.encode("ascii"))
    if request.async_window is not None:
        user += _item(0x53, struct.pack(">HH", 1, 1))
    for uid, scu, scp in roles:
        user += _item(0x54, _with_length(uid.encode("ascii")) + bytes((int(scu), int(scp))))
    if implementation_version:
        user += _item(0x55, implementation_version.encode("ascii")[:16])
    if identity_response is not None:
        user += _item(0x59, _with_length(identity_response))
    body = fixed + items + _item(0x50, user)
    return PDU_HEADER.pack(ASSOCIATE_AC, len(body)) + body
