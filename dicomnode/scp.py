"""The Storage SCP: accept associations, persist each instance durably, answer a named DIMSE status.

Handlers only persist and answer; nothing here decodes pixels or processes images. Statuses (PS3.4 B.2.3):

- ``0x0000`` Success: only once the file and its folder are fsynced and the instance is recorded.
- ``0xA700`` Refused, out of resources: free space under ``storage.min_free_mb`` or the disk filled while
  writing (nothing is stored), or the state store was unavailable (the complete file stays in the spool and
  start-up recovery records it). The sender may retry; a repeated instance counts once.
- ``0xA900`` Error, data set does not match SOP class: the data set's SOP Class/Instance UID disagree with the
  C-STORE request.
- ``0xC000`` Error, cannot understand: the data set cannot be parsed or lacks Study/Series/SOP Instance UIDs.

Network details: TCP_NODELAY on every accepted socket (Nagle costs ~45 ms per instance on loopback),
SO_REUSEPORT so several receiver processes can share one port, an optional peer host allow-list checked at
connection time, and the calling AE allow-list enforced by pynetdicom with the standard A-ASSOCIATE-RJ reason
(rejected-permanent, service-user, calling-AE-title-not-recognized).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import metrics
from dicomnode.config import Config, TlsConfig
from dicomnode.spool import OutOfSpace, Spool, is_valid_uid
from dicomnode.store import InstanceMeta, RecordOutcome, Store

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass
class ReceiveContext:
    """What the C-STORE handler needs, bound as a handler argument (no globals)."""

    config: Config
    spool: Spool
    store: Store
    on_received: Any = None  # optional callback(meta, size, outcome) for metrics
    _series_by_assoc: dict[int, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note_series(self, assoc: object, series_uid: str) -> None:
        with self._lock:
            self._series_by_assoc.setdefault(id(assoc), set()).add(series_uid)

    def pop_series(self, assoc: object) -> set[str]:
        with self._lock:
            return self._series_by_assoc.pop(id(assoc), set())


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pixel_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """Cheap check of an image's pixel data (lengths only, nothing decoded): catches truncation."""
    if "Rows" not in ds or "Columns" not in ds:
        return None  # not an image (SR, presentation state, ...)
    present = [k for k in _PIXEL_KEYWORDS if k in ds]
    if not present:
        return "image data set (Rows/Columns present) has no Pixel Data"
    if present[0] != "PixelData" or transfer_syntax not in _UNCOMPRESSED:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        actual = len(ds.PixelData)
    except Exception as exc:
        return f"image pixel description cannot be read: {exc}"
    if actual < expected:
        return f"Pixel Data has {actual} bytes, Rows x Columns x frames x samples x bits needs {expected}"
    return None


def instance_meta(event: evt.Event) -> InstanceMeta:
    """Read the identifying header attributes of the received data set (no pixel data is decoded)."""
    request: Any = event.request
    try:
        ds = event.dataset
        uids = {k: _text(ds, k) for k in
                ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
        extra = {k: _text(ds, k) for k in ("Modality", "BodyPartExamined", "SeriesDescription", "ImageType")}
    except Exception as exc:  # pydicom raises many types on malformed input
        raise _Reject(CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise _Reject(CANNOT_UNDERSTAND, "data set cannot be parsed: no data element could be read")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uids[k]]
    if missing:
        raise _Reject(CANNOT_UNDERSTAND, f"data set lacks {', '.join(missing)}")
    bad = [k for k, v in uids.items() if v and not is_valid_uid(v)]
    if bad:
        raise _Reject(CANNOT_UNDERSTAND, f"invalid UID in {', '.join(bad)}")
    if uids["SOPInstanceUID"] != str(request.AffectedSOPInstanceUID):
        raise _Reject(DATASET_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
    if uids["SOPClassUID"] and uids["SOPClassUID"] != str(request.AffectedSOPClassUID):
        raise _Reject(DATASET_MISMATCH, "SOPClassUID differs from the request's Affected SOP Class UID")
    problem = _pixel_problem(ds, str(event.context.transfer_syntax))
    if problem:
        raise _Reject(DATASET_MISMATCH, problem)
    return InstanceMeta(
        sop_uid=uids["SOPInstanceUID"], sop_class_uid=str(request.AffectedSOPClassUID),
        series_uid=uids["SeriesInstanceUID"], study_uid=uids["StudyInstanceUID"],
        transfer_syntax=str(event.context.transfer_syntax), modality=extra["Modality"],
        body_part=extra["BodyPartExamined"], description=extra["SeriesDescription"],
        image_type=extra["ImageType"], calling_aet=event.assoc.requestor.ae_title.strip())


def handle_store(event: evt.Event, ctx: ReceiveContext) -> int:
    """EVT_C_STORE: spool the encoded data set (fsync), record it, then answer. See the module docstring."""
    peer = f"{event.assoc.requestor.ae_title.strip()}@{event.assoc.requestor.address}"
    try:
        meta = instance_meta(event)
    except _Reject as rej:
        log.warning("C-STORE from %s refused with 0x%04X: %s", peer, rej.status, rej)
        metrics.rejection(f"status:0x{rej.status:04X}")
        return rej.status
    try:
        spooled = ctx.spool.write(meta.series_uid, meta.sop_uid, event.encoded_dataset())
    except OutOfSpace as exc:
        log.error("C-STORE from %s refused with 0xA700: %s", peer, exc)
        metrics.rejection("status:0xA700")
        return OUT_OF_RESOURCES
    except OSError as exc:
        log.error("C-STORE from %s refused with 0xA700: cannot write spool file: %s", peer, exc)
        metrics.rejection("status:0xA700")
        return OUT_OF_RESOURCES
    try:
        outcome, moved = ctx.store.record_instance(
            meta, spooled.path, spooled.size, now=time.time(),
            reprocess_late=ctx.config.completion.on_late_instance.value == "reprocess")
    except Exception as exc:  # never answer success without a row
        # The file stays: it is complete and durable (it may be the replacement of an earlier acknowledged
        # copy under the same name), and start-up recovery records any spool file that has no row.
        log.error("C-STORE from %s refused with 0xA700: state store unavailable: %s", peer, exc)
        metrics.rejection("status:0xA700")
        return OUT_OF_RESOURCES
    if moved:
        try:
            os.unlink(moved)
        except OSError:
            log.warning("could not remove the replaced copy %s", moved)
    if outcome is not RecordOutcome.NEW:
        log.info("instance %s of series %s: %s", meta.sop_uid, meta.series_uid, outcome.value)
    ctx.note_series(event.assoc, meta.series_uid)
    metrics.instance_received(spooled.size)
    if ctx.on_received is not None:
        ctx.on_received(meta, spooled.size, outcome)
    return SUCCESS


def handle_released(event: evt.Event, ctx: ReceiveContext) -> None:
    """EVT_RELEASED: the sender finished normally; that is evidence (not proof) its series are complete."""
    series = ctx.pop_series(event.assoc)
    if series:
        ctx.store.mark_released(sorted(series), now=time.time())


def handle_aborted(event: evt.Event, ctx: ReceiveContext) -> None:
    ctx.pop_series(event.assoc)


def handle_acse_sent(event: evt.Event) -> None:
    """EVT_ACSE_SENT: count accepted associations, and rejections by their A-ASSOCIATE-RJ reason."""
    primitive: Any = getattr(event, "primitive", None)
    if type(primitive).__name__ != "A_ASSOCIATE":
        return
    if primitive.result == 0x00:
        metrics.association_accepted()
    elif primitive.result in (0x01, 0x02):
        reason = str(primitive.reason_str).lower().replace(" ", "-")
        metrics.rejection(f"association:{reason}")


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT, TCP_NODELAY and a peer host allow-list."""

    allowed_hosts: frozenset[str] = frozenset()
    handshake_timeout: float = 30.0

    def server_bind(self) -> None:
        if hasattr(socket, "SO_REUSEPORT"):
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            # The handshake runs in the accepting thread: bound it, so a silent client cannot stall accepting.
            sock.settimeout(self.handshake_timeout)
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            except (OSError, ValueError) as exc:
                sock.close()
                log.warning("TLS handshake with %s failed: %s", address[0], exc)
                metrics.rejection("tls-handshake")
                raise OSError(f"TLS handshake failed: {exc}") from exc  # socketserver drops the request
            sock.settimeout(None)
        return sock, address

    def shutdown(self) -> None:
        """Stop serving and close the socket (pynetdicom's own shutdown assumes ae.start_server made us)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allowed_hosts and client_address[0] not in self.allowed_hosts:
            log.warning("connection from %s refused: host not in node.allowed_hosts", client_address[0])
            return False
        return True


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


def make_ae(cfg: Config) -> ApplicationEntity:
    """The acceptor AE: Verification and every storage SOP class in every transfer syntax pynetdicom knows."""
    node = cfg.node
    ae = ApplicationEntity(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.require_called_aet = True
    if node.allowed_calling_aets:
        ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    return ae


# pynetdicom's DUL reactor sleeps this long whenever a loop found nothing to do (its default is 1 ms). A large
# instance arrives in several PDUs, so those sleeps add up; 0.2 ms measured ~10 % more instances/s on one
# association (scripts/bench_ingest.py) for a little more idle CPU per open association.
DUL_LOOP_DELAY_S = 0.0002


def handle_conn_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN: shorten the reactor's idle sleep for this association (see DUL_LOOP_DELAY_S)."""
    event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S


def start_server(cfg: Config, ctx: ReceiveContext) -> NodeServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it."""
    ae = make_ae(cfg)
    handlers: list[Any] = [(evt.EVT_C_STORE, handle_store, [ctx]), (evt.EVT_RELEASED, handle_released, [ctx]),
                (evt.EVT_ABORTED, handle_aborted, [ctx]), (evt.EVT_ACSE_SENT, handle_acse_sent),
                (evt.EVT_CONN_OPEN, handle_conn_open)]
    server = cast(NodeServer, ae.make_server(
        (cfg.node.host, cfg.node.port), evt_handlers=handlers, server_class=NodeServer,
        ssl_context=server_ssl_context(cfg.node.tls)))
    server.allowed_hosts = frozenset(cfg.node.allowed_hosts)
    server.handshake_timeout = cfg.node.acse_timeout
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    log.info("listening as %s on %s:%d", cfg.node.ae_title, cfg.node.host, server.server_address[1])
    return server
