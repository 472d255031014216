"""The Storage SCP: accept associations, persist each instance durably, answer a named DIMSE status.

Handlers only persist and answer; nothing here decodes pixels or processes images. The protocol is the upper
layer (:mod:`dicomnode.receive.upper_layer` and the modules it names); what a data set is and whether it is
acceptable is :mod:`dicomnode.receive.instance`; this module decides what happens to it. It streams into a
spool incoming file as it arrives, and once complete:

- ``0x0000`` Success: only once the file and its folder are fsynced and the instance is recorded.
- ``0xA700`` Refused, out of resources: free space under ``storage.min_free_mb`` or the disk filled while
  writing (nothing is stored), or the state store was unavailable (the complete file stays in the spool and
  start-up recovery records it). The sender may retry; a repeated instance counts once. The Error Comment says
  what ("out of space"), never where: paths stay in the log.
- ``0xA900`` / ``0xC000``: see :mod:`dicomnode.receive.instance`.

Failures carry an Error Comment (0000,0902) that says why, and the same reason goes to the log.

The stored file is the data set exactly as received, behind a Part 10 preamble and file meta group built from
the C-STORE request and its presentation context (Media Storage SOP Class/Instance, Transfer Syntax, Source AE).
A SOP Instance UID stored before replaces the earlier copy (counted once); when the earlier copy belongs to
another series, a warning names both series.

Network details: TCP_NODELAY on every accepted socket (Nagle costs ~45 ms per instance on loopback), one
listening socket whose accept queue every receiver process shares, an optional peer host allow-list checked at
connection time, TLS, the calling AE allow-list with the standard A-ASSOCIATE-RJ reason, optional User Identity
checking, and storage SOP classes the DICOM registry does not know accepted when
``node.accept_unknown_sop_classes`` is set.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.config import Config, TlsConfig
from dicomnode.errors import DicomNodeError
from dicomnode.receive.connection import UpperLayerServer
from dicomnode.receive.dimse import VERIFICATION
from dicomnode.receive.instance import CANNOT_UNDERSTAND, Refusal, file_meta, read_meta
from dicomnode.receive.negotiation import Capabilities, Credential, other_service_in_dicom
from dicomnode.receive.upper_layer import AcceptorSettings, Association, StoreRequest
from dicomnode.state.spool import IncomingFile, OutOfSpace, Spool, is_valid_uid
from dicomnode.state.store import RecordOutcome, Store
from dicomnode.telemetry import metrics

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
_YIELD_PER_CONNECTION = 0.002  # s a busy receiver waits per open connection before taking a new one


def _resource_problem(exc: OutOfSpace | OSError) -> tuple[int, str, str]:
    """(status, comment for the peer, detail for the log) of a failed spool write: the peer learns what went
    wrong, never where (the spool's paths stay in the log)."""
    if isinstance(exc, OutOfSpace) or exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OUT_OF_RESOURCES, "out of space", str(exc)
    return OUT_OF_RESOURCES, "cannot write the instance to disk", f"cannot write spool file: {exc}"


class _SpoolSink:
    """One C-STORE data set on its way into the spool (see :class:`dicomnode.receive.upper_layer.DataSink`)."""

    def __init__(self, ctx: ReceiveContext, assoc: Association[StoreSession], request: StoreRequest) -> None:
        self.ctx, self.assoc, self.request = ctx, assoc, request
        self.refusal: tuple[int, str] | None = None
        self.incoming: IncomingFile | None = None
        self.meta_length = 0
        if not (is_valid_uid(request.sop_instance_uid) and is_valid_uid(request.sop_class_uid)):
            self.refusal = (CANNOT_UNDERSTAND, "the C-STORE request lacks a valid Affected SOP Class/Instance UID")
            return
        try:
            self.incoming = ctx.take_spare(assoc)
            preamble_and_meta = file_meta(request, assoc.calling_aet)
            self.meta_length = len(preamble_and_meta)
            self.incoming.write(preamble_and_meta)
        except (OutOfSpace, OSError) as exc:
            self._refuse(*_resource_problem(exc))
        except BaseException:
            self._refuse(OUT_OF_RESOURCES, "internal error")  # never leave the spool file open behind us
            raise

    def _refuse(self, status: int, comment: str, detail: str = "") -> None:
        """Refuse the instance: ``comment`` goes to the peer, ``detail`` (paths and all) only to the log."""
        self.refusal = (status, comment)
        if detail:
            log.log(logging.ERROR if status == OUT_OF_RESOURCES else logging.WARNING,
                    "C-STORE from %s: %s", self.assoc.peer, detail)
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    def write(self, fragment: memoryview) -> None:
        if self.incoming is None:
            return  # refused: the rest of the data set is read and dropped
        try:
            self.incoming.write(fragment)
        except (OutOfSpace, OSError) as exc:
            self._refuse(*_resource_problem(exc))

    def abandon(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    def finish(self) -> tuple[int, str]:
        status, reason = self._finish()
        if status != SUCCESS:
            log.log(logging.ERROR if status == OUT_OF_RESOURCES else logging.WARNING,
                    "C-STORE from %s refused with 0x%04X: %s", self.assoc.peer, status, reason)
            metrics.rejection(f"status:0x{status:04X}")
        return status, reason

    def _finish(self) -> tuple[int, str]:
        incoming, self.incoming = self.incoming, None
        if incoming is None:
            return self.refusal or (OUT_OF_RESOURCES, "spool file unavailable")
        ctx = self.ctx
        try:
            meta = read_meta(incoming, self.meta_length, self.assoc.calling_aet, self.request)
            spooled = incoming.commit(meta.series_uid, meta.sop_uid)
        except Refusal as rej:
            incoming.discard()
            return rej.status, str(rej)
        except (OutOfSpace, OSError) as exc:
            incoming.discard()
            status, comment, detail = _resource_problem(exc)
            log.error("C-STORE from %s: %s", self.assoc.peer, detail)
            return status, comment
        try:
            outcome, moved = ctx.store.record_instance(
                meta, spooled.path, spooled.size, now=time.time(),
                reprocess_late=ctx.config.completion.on_late_instance.value == "reprocess")
        except Exception as exc:  # never answer success without a row
            # The file stays: it is complete and durable (it may be the replacement of an earlier acknowledged
            # copy under the same name), and start-up recovery records any spool file that has no row.
            log.error("C-STORE from %s: state store unavailable: %s", self.assoc.peer, exc)
            return OUT_OF_RESOURCES, "state store unavailable"
        if moved:
            self._replaced(meta.sop_uid, meta.series_uid, Path(moved))
        if outcome is not RecordOutcome.NEW:
            log.info("instance %s of series %s: %s", meta.sop_uid, meta.series_uid, outcome.value)
        session = self.assoc.session
        session.series.add(meta.series_uid)
        session.last_series = meta.series_uid
        session.stored += 1
        metrics.instance_received(spooled.size)
        if ctx.on_received is not None:
            ctx.on_received(meta, spooled.size, outcome)
        return SUCCESS, ""


    def _replaced(self, sop_uid: str, series_uid: str, moved: Path) -> None:
        """The replace rule: a repeated SOP Instance UID replaces the earlier copy. The earlier copy lay under
        another name, so in another series (the file name is the SOP Instance UID): say so, and remove it."""
        log.warning("SOP Instance UID %s arrived in series %s but was stored under series %s: the new copy"
                    " replaces the earlier one", sop_uid, series_uid, moved.parent.name)
        try:
            os.unlink(moved)
        except OSError:
            log.warning("could not remove the replaced copy %s", moved)


@dataclass
class StoreSession:
    """The SCP's bookkeeping for one association: what it stored, and the spool file made for its next
    instance (see :meth:`ReceiveContext.answered`)."""

    series: set[str] = field(default_factory=set)
    last_series: str | None = None
    stored: int = 0
    spare: IncomingFile | None = None


@dataclass
class ReceiveContext:
    """What the receiving side needs (no globals): the SCP's
    :class:`~dicomnode.receive.upper_layer.StorageHandler`."""

    config: Config
    spool: Spool
    store: Store
    on_received: Any = None  # optional callback(meta, size, outcome) for metrics
    on_released: Any = None  # optional callback() once a release is recorded: rings the workers' bell

    def new_session(self) -> StoreSession:
        return StoreSession()

    def accepted(self, assoc: Association[StoreSession]) -> None:
        metrics.association_accepted()

    def rejected(self, address: str, calling_aet: str, reason: str) -> None:
        metrics.rejection(f"association:{reason}")

    def refused(self, address: str, reason: str) -> None:
        metrics.rejection(reason)

    def open_store(self, assoc: Association[StoreSession], request: StoreRequest) -> _SpoolSink:
        return _SpoolSink(self, assoc, request)

    def answered(self, assoc: Association[StoreSession]) -> None:
        """Make the next instance's spool file now, while the peer prepares it: creating a file waits on the
        file system's journal (about 0.3 ms here), time that would otherwise sit between data and answer. It is
        made in the folder of the series just stored, so its commit is a rename within one folder."""
        if assoc.session.spare is not None:
            return
        try:
            assoc.session.spare = self.spool.incoming(near=assoc.session.last_series)
        except (OutOfSpace, OSError):  # the next C-STORE finds out again, and answers for it
            pass

    def take_spare(self, assoc: Association[StoreSession]) -> IncomingFile:
        """The association's prepared spool file, or a new one; :class:`OutOfSpace` under the free-space floor."""
        spare, assoc.session.spare = assoc.session.spare, None
        if spare is None:
            return self.spool.incoming()
        if not self.spool.has_room():
            spare.discard()
            return self.spool.incoming()  # raises OutOfSpace
        return spare

    def _drop_spare(self, assoc: Association[StoreSession]) -> None:
        spare, assoc.session.spare = assoc.session.spare, None
        if spare is not None:
            spare.discard()

    def released(self, assoc: Association[StoreSession]) -> None:
        """The sender finished normally; that is evidence (not proof) its series are complete."""
        self._drop_spare(assoc)
        series = assoc.session.series
        log.info("association from %s released: %d instance(s) stored in %d series", assoc.peer,
                 assoc.session.stored, len(series))
        if series:
            self.store.mark_released(sorted(series), now=time.time())
            if self.on_released is not None:
                self.on_released()  # idle workers judge these series now, not at their next poll

    def aborted(self, assoc: Association[StoreSession]) -> None:
        self._drop_spare(assoc)

    def ended(self, assoc: Association[StoreSession]) -> None:
        self._drop_spare(assoc)
        self.store.close()  # this association thread's connection: closed now, not when collected


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """TLS context for the SCP from the config (None when TLS is off)."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def capabilities(cfg: Config) -> Capabilities:
    """Verification and every storage SOP class pynetdicom knows, each in every transfer syntax it knows (its
    order: uncompressed first); unknown storage SOP classes per ``node.accept_unknown_sop_classes``; the users
    of ``node.user_identity``."""
    identity = cfg.node.user_identity
    return Capabilities(
        sop_classes=frozenset([VERIFICATION] + [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]),
        transfer_syntaxes=tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES), is_other_service=other_service_in_dicom,
        accept_unknown=cfg.node.accept_unknown_sop_classes,
        users=tuple(Credential(u.username, u.passcode) for u in identity.users),
        identity_required=identity.required)


def acceptor_settings(cfg: Config) -> AcceptorSettings:
    node = cfg.node
    return AcceptorSettings(
        ae_title=node.ae_title, allowed_calling_aets=frozenset(node.allowed_calling_aets),
        allowed_hosts=frozenset(node.allowed_hosts), max_pdu=node.max_pdu_size, acse_timeout=node.acse_timeout,
        network_timeout=node.network_timeout, max_associations=node.max_associations,
        max_pending=node.max_pending_connections, implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
        # With several receivers on one socket, new associations go to the least busy. When the first receiver to
        # wake took each one, 4 associations on 2 receivers split 3+1 in 2 of 5 runs here, and the 3 then share
        # one process's GIL. (On 2 cores the throughput gain is within the noise; it matters with more cores.)
        yield_per_connection=_YIELD_PER_CONNECTION if cfg.node.receivers > 1 else 0.0)


def listen(cfg: Config) -> socket.socket:
    """The node's listening socket. ``serve`` opens it once, before the receiver processes start, and every
    receiver accepts from it: one accept queue, so a new association goes to whichever receiver is free to take
    it (SO_REUSEPORT would hash it to a fixed one), and a second node on the same port fails here instead of
    silently taking half of the associations."""
    family = socket.AF_INET6 if ":" in cfg.node.host else socket.AF_INET
    try:
        return socket.create_server((cfg.node.host, cfg.node.port), family=family, backlog=128)
    except OSError as exc:
        raise DicomNodeError(f"cannot listen on {cfg.node.host}:{cfg.node.port}: {exc.strerror or exc}") from exc


def start_server(cfg: Config, ctx: ReceiveContext, listener: socket.socket | None = None) -> UpperLayerServer:
    """Start accepting on ``listener`` (by default a new one from :func:`listen`) in a background thread;
    returns the server, whose ``shutdown()`` stops it."""
    server = UpperLayerServer(acceptor_settings(cfg), ctx, capabilities(cfg), listener or listen(cfg),
                              ssl_context=server_ssl_context(cfg.node.tls))
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    log.info("listening as %s on %s:%d", cfg.node.ae_title, cfg.node.host, server.server_address[1])
    return server
