"""Judging an A-ASSOCIATE-RQ (PS3.8 AE-6, PS3.7 Annex D.3.3): reject it with the standard reason, or accept
it with an answer for every presentation context and every negotiation item the requestor sent.

- Presentation contexts: Verification and the storage SOP classes the node knows are accepted in the first
  transfer syntax of :attr:`Capabilities.transfer_syntaxes` the requestor proposes (else result 4, transfer
  syntaxes not supported). A valid UID that DICOM's registry does not know (a private or newer storage SOP
  class, or one pynetdicom does not list) is accepted the same way when ``accept_unknown`` is set; a registered
  UID that is not a storage SOP class (query, worklist, ...) and an invalid UID get result 3, abstract syntax
  not supported.
- SCP/SCU role selection: the requestor may be SCU (the default); it may not be SCP (this receiver never sends
  C-STOREs on an association it accepted). A context whose requestor would be SCP only is rejected (result 1).
- Asynchronous operations window: answered 1/1, one operation at a time. SOP Class (Common) Extended
  Negotiation: no answer, which PS3.7 D.3.3.5-6 reads as "not supported"; the association goes ahead.
- User Identity: when users are configured, a username (type 1) or username and passcode (type 2) is checked;
  a requestor that asks for a positive response gets one (PS3.7 D.3.3.7.2: empty server response). One that
  does not match is rejected (permanent, service user, no reason given); a requestor that presents none, or
  one the node cannot verify (Kerberos, SAML, JWT), is rejected so only when ``identity_required``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID

from dicomnode.receive.acse import AssociateRequest, ContextResult, ProposedContext, encode_associate_ac
from dicomnode.receive.pdu import (
    REJECT_APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_NO_REASON,
    REJECT_PROTOCOL_VERSION,
)
from dicomnode.receive.upper_layer import APPLICATION_CONTEXT, AcceptorSettings
from dicomnode.state.spool import is_valid_uid

ACCEPTANCE, USER_REJECTION, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 1, 3, 4
USERNAME, USERNAME_AND_PASSCODE = 1, 2


@dataclass(frozen=True)
class Credential:
    username: str
    passcode: str = ""  # "" : the username alone suffices (identity type 1 or 2)


@dataclass(frozen=True)
class Capabilities:
    """What this acceptor offers: the SOP classes it serves, its transfer syntaxes in order of preference,
    whether it takes other storage SOP classes (private, or newer than pynetdicom's list) too, with
    ``is_other_service`` naming the UIDs that are something else (query, worklist, ...), and the users it checks."""

    sop_classes: frozenset[str]
    transfer_syntaxes: tuple[str, ...]
    is_other_service: Callable[[str], bool]
    accept_unknown: bool = True
    users: tuple[Credential, ...] = ()
    identity_required: bool = False


@dataclass(frozen=True)
class Rejection:
    reject: tuple[int, int, int]  # (result, source, reason) of the A-ASSOCIATE-RJ
    why: str  # for logs and metrics


@dataclass(frozen=True)
class Acceptance:
    ac_pdu: bytes
    contexts: dict[int, tuple[str, str]]  # accepted: id -> (abstract syntax, transfer syntax)
    proposed: int
    user: str


def check_peer(request: AssociateRequest, settings: AcceptorSettings) -> Rejection | None:
    """The checks on who is asking, in PS3.8's order of reasons; None when the request may go on."""
    if not request.protocol_version & 1:
        return Rejection(REJECT_PROTOCOL_VERSION, "protocol-version-not-supported")
    if request.application_context != APPLICATION_CONTEXT:
        return Rejection(REJECT_APPLICATION_CONTEXT, "application-context-name-not-supported")
    if settings.allowed_calling_aets and request.calling_ae not in settings.allowed_calling_aets:
        return Rejection(REJECT_CALLING_AE, "calling-ae-title-not-recognised")
    if request.called_ae != settings.ae_title:
        return Rejection(REJECT_CALLED_AE, "called-ae-title-not-recognised")
    return None


def check_identity(request: AssociateRequest, caps: Capabilities) -> tuple[str, bytes | None] | Rejection:
    """(the proven username or "", the User Identity server response or None), or the rejection."""
    identity = request.user_identity
    if not caps.users:
        return "", None
    if identity is not None and identity.kind in (USERNAME, USERNAME_AND_PASSCODE):
        for user in caps.users:
            name_ok = hmac.compare_digest(identity.primary, user.username.encode("utf-8"))
            code_ok = not user.passcode or (identity.kind == USERNAME_AND_PASSCODE and hmac.compare_digest(
                identity.secondary, user.passcode.encode("utf-8")))
            if name_ok and code_ok:
                return user.username, (b"" if identity.positive_response_requested else None)
        return Rejection(REJECT_NO_REASON, "user-identity-not-accepted")
    if caps.identity_required:
        return Rejection(REJECT_NO_REASON, "user-identity-required")
    return "", None


def _context_result(cx: ProposedContext, caps: Capabilities, refused_roles: set[str]) -> ContextResult:
    first = cx.transfer_syntaxes[0]
    abstract = cx.abstract_syntax
    if not is_valid_uid(abstract):
        return ContextResult(cx.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, first)
    served = abstract in caps.sop_classes or (caps.accept_unknown and not caps.is_other_service(abstract))
    if not served:
        return ContextResult(cx.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, first, abstract)
    if abstract in refused_roles:
        return ContextResult(cx.context_id, USER_REJECTION, first, abstract)
    proposed = set(cx.transfer_syntaxes)
    for syntax in caps.transfer_syntaxes:
        if syntax in proposed:
            return ContextResult(cx.context_id, ACCEPTANCE, syntax, abstract)
    return ContextResult(cx.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, first, abstract)


def _roles(request: AssociateRequest) -> tuple[list[tuple[str, bool, bool]], set[str]]:
    """Role replies (SOP class, requestor may be SCU, requestor may be SCP) and the SOP classes whose contexts
    no role is left for (the requestor proposed to be SCP only, or neither)."""
    replies: list[tuple[str, bool, bool]] = []
    refused: set[str] = set()
    seen: set[str] = set()
    for role in request.roles:
        if role.sop_class_uid in seen or not is_valid_uid(role.sop_class_uid):
            continue
        seen.add(role.sop_class_uid)
        if role.scu:
            replies.append((role.sop_class_uid, True, False))
        else:
            refused.add(role.sop_class_uid)
    return replies, refused


def negotiate(request: AssociateRequest, settings: AcceptorSettings, caps: Capabilities) -> Acceptance | Rejection:
    """Accept or reject ``request`` (the association slot is the caller's to take: local limit)."""
    rejection = check_peer(request, settings)
    if rejection is not None:
        return rejection
    identity = check_identity(request, caps)
    if isinstance(identity, Rejection):
        return identity
    user, identity_response = identity
    role_replies, refused_roles = _roles(request)
    results, ids = [], set()
    for cx in request.contexts:
        if cx.context_id in ids:  # a repeated context ID: the first one stands, the others are not answered
            continue
        ids.add(cx.context_id)
        results.append(_context_result(cx, caps, refused_roles))
    accepted = {r.context_id: (r.abstract_syntax, r.transfer_syntax) for r in results if r.result == ACCEPTANCE}
    used = {abstract for abstract, _ in accepted.values()}
    ac = encode_associate_ac(
        request, results, max_pdu=settings.max_pdu, implementation_uid=settings.implementation_uid,
        implementation_version=settings.implementation_version,
        roles=[reply for reply in role_replies if reply[0] in used], identity_response=identity_response)
    return Acceptance(ac, accepted, len(results), user)


def other_service_in_dicom(uid: str) -> bool:
    """True when pydicom's copy of the DICOM registry (PS3.6 Annex A) names ``uid`` as anything but a storage
    SOP class: query/retrieve, worklist, storage commitment, a transfer syntax, a well-known instance..."""
    known = UID(uid)
    if known.name == uid:
        return False  # not registered: a private UID, or one newer than the registry
    return not (known.type == "SOP Class" and "Storage" in known.name and "Storage Commitment" not in known.name)
