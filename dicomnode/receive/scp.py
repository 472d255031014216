"""The Storage SCP: accept associations, persist each instance durably, answer a named DIMSE status.

Handlers only persist and answer; nothing here decodes pixels or processes images. The protocol (association
negotiation, P-DATA, DIMSE command sets) is :mod:`dicomnode.receive.upper_layer`; this module decides what
happens to a data set. It streams into a spool incoming file as it arrives, and once complete:

- ``0x0000`` Success: only once the file and its folder are fsynced and the instance is recorded.
- ``0xA700`` Refused, out of resources: free space under ``storage.min_free_mb`` or the disk filled while
  writing (nothing is stored), or the state store was unavailable (the complete file stays in the spool and
  start-up recovery records it). The sender may retry; a repeated instance counts once.
- ``0xA900`` Error, data set does not match SOP class: the data set's SOP Class/Instance UID disagree with the
  C-STORE request, or an image lacks (some of) its pixel data.
- ``0xC000`` Error, cannot understand: the data set cannot be parsed or lacks Study/Series/SOP Instance UIDs.

Failures carry an Error Comment (0000,0902) that says why, and the same reason goes to the log.

The stored file is the data set exactly as received, behind a Part 10 preamble and file meta group built from
the C-STORE request and its presentation context (Media Storage SOP Class/Instance, Transfer Syntax, Source AE).

Network details: TCP_NODELAY on every accepted socket (Nagle costs ~45 ms per instance on loopback),
one listening socket whose accept queue every receiver process shares, an optional peer host allow-list checked at
connection time, TLS (the handshake runs in the connection's own thread, bounded by ``node.acse_timeout``), and
the calling AE allow-list with the standard A-ASSOCIATE-RJ reason (rejected-permanent, service-user,
calling-AE-title-not-recognized).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.config import Config, TlsConfig
from dicomnode.errors import DicomNodeError
from dicomnode.receive.header import (
    DEFLATED_LE,
    DOUBLE_PIXEL_DATA,
    FLOAT_PIXEL_DATA,
    PIXEL_DATA,
    WANTED,
    Header,
    HeaderError,
    read_header,
)
from dicomnode.receive.upper_layer import VERIFICATION, AcceptorSettings, Association, StoreRequest, UpperLayerServer
from dicomnode.state.spool import IncomingFile, OutOfSpace, Spool, is_valid_uid
from dicomnode.state.store import InstanceMeta, RecordOutcome, Store
from dicomnode.telemetry import metrics

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
_YIELD_PER_CONNECTION = 0.002  # s a busy receiver waits per open connection before taking a new one


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
_PIXEL_TAGS = {PIXEL_DATA: "PixelData", FLOAT_PIXEL_DATA: "FloatPixelData", DOUBLE_PIXEL_DATA: "DoubleFloatPixelData"}


def _header_with_pydicom(path: Path, size: int, transfer_syntax: str) -> Header:
    """The same :class:`Header` from pydicom's full parse: for what the fast walk leaves alone."""
    try:
        # Deferred values are found again by file offset, which means nothing inside a deflated stream.
        ds = pydicom.dcmread(path, defer_size=None if transfer_syntax == DEFLATED_LE else 1024)
        values: dict[str, str | int] = {}
        for keyword in WANTED.values():
            if keyword in ds:
                value = ds[keyword].value
                values[keyword] = value if isinstance(value, int) else _text(ds, keyword)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise _Reject(CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise _Reject(CANNOT_UNDERSTAND, "data set cannot be parsed: no data element could be read")
    header = Header(values)
    present = [(tag, keyword) for tag, keyword in _PIXEL_TAGS.items() if keyword in ds]
    if present:
        header.pixel_tag, keyword = present[0]
        raw: Any = ds.get_item(keyword, keep_deferred=True)
        if getattr(raw, "value", None) is None and getattr(raw, "value_tell", None) is not None:
            header.pixel_length = None if raw.length == 0xFFFFFFFF else int(raw.length)
            header.pixel_available = max(0, min(int(raw.length), size - int(raw.value_tell)))  # what the file holds
        else:
            header.pixel_length = header.pixel_available = len(ds[keyword].value or b"")
    return header


# Photometric interpretations whose chroma is sampled once per two pixels of a row: in native (uncompressed)
# encoding each pair of pixels carries Y Y Cb Cr, two samples per pixel instead of three (PS3.3 C.7.6.3.1.2).
_HALF_CHROMA = {"YBR_FULL_422", "YBR_PARTIAL_422"}


def expected_pixel_bytes(values: dict[str, str | int]) -> int:
    """Bytes of native Pixel Data an image's description calls for (PS3.5 8.1.1, PS3.3 C.7.6.3.1.2):
    Rows x Columns x frames x samples x Bits Allocated, in bits, rounded up to whole bytes (Bits Allocated 1
    packs 8 pixels per byte), with two samples per pixel for the 4:2:2 YBR interpretations. The value's pad byte
    to an even length is not counted. Raises KeyError/ValueError when the description cannot be read."""
    frames = int(str(values.get("NumberOfFrames") or 1))
    samples = int(values.get("SamplesPerPixel", 1))
    if samples == 3 and str(values.get("PhotometricInterpretation", "")).strip() in _HALF_CHROMA:
        samples = 2
    bits = int(values["Rows"]) * int(values["Columns"]) * frames * samples * int(values["BitsAllocated"])
    return (bits + 7) // 8


def _pixel_problem(header: Header, transfer_syntax: str) -> str | None:
    """Cheap check of an image's pixel data (lengths only, nothing decoded): catches truncation."""
    values = header.values
    if "Rows" not in values or "Columns" not in values:
        return None  # not an image (SR, presentation state, ...)
    if header.pixel_tag is None:
        return "image data set (Rows/Columns present) has no Pixel Data"
    if header.pixel_tag != PIXEL_DATA or transfer_syntax not in _UNCOMPRESSED:
        return None
    try:
        expected = expected_pixel_bytes(values)
    except (KeyError, ValueError) as exc:
        return f"image pixel description cannot be read: {type(exc).__name__}: {exc}"
    if header.pixel_length is None:
        return "native Pixel Data of undefined length"
    if header.pixel_available < expected:
        return f"Pixel Data has {header.pixel_available} bytes, the image description needs {expected}"
    return None


def read_meta(incoming: IncomingFile, meta_length: int, assoc: Association[StoreSession],
              request: StoreRequest) -> InstanceMeta:
    """Read the identifying header attributes of a received instance (flushed, not yet committed)."""
    size = incoming.size - meta_length
    header: Header | None = None
    if size > 0:
        with incoming.contents() as whole:
            view = whole[meta_length:]
            try:
                header = read_header(view, size, request.transfer_syntax)
            except HeaderError:
                header = None  # pydicom decides, and names the problem
            finally:
                view.release()
    if header is None:
        incoming.flush()
        header = _header_with_pydicom(incoming.path, incoming.size, request.transfer_syntax)
    uids = {k: str(header.values.get(k, "")) for k in
            ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    extra = {k: str(header.values.get(k, "")) for k in
             ("Modality", "BodyPartExamined", "SeriesDescription", "ImageType")}
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uids[k]]
    if missing:
        raise _Reject(CANNOT_UNDERSTAND, f"data set lacks {', '.join(missing)}")
    bad = [k for k, v in uids.items() if v and not is_valid_uid(v)]
    if bad:
        raise _Reject(CANNOT_UNDERSTAND, f"invalid UID in {', '.join(bad)}")
    if uids["SOPInstanceUID"] != request.sop_instance_uid:
        raise _Reject(DATASET_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP Instance UID")
    if uids["SOPClassUID"] and uids["SOPClassUID"] != request.sop_class_uid:
        raise _Reject(DATASET_MISMATCH, "SOPClassUID differs from the request's Affected SOP Class UID")
    problem = _pixel_problem(header, request.transfer_syntax)
    if problem:
        raise _Reject(DATASET_MISMATCH, problem)
    return InstanceMeta(
        sop_uid=uids["SOPInstanceUID"], sop_class_uid=request.sop_class_uid,
        series_uid=uids["SeriesInstanceUID"], study_uid=uids["StudyInstanceUID"],
        transfer_syntax=request.transfer_syntax, modality=extra["Modality"],
        body_part=extra["BodyPartExamined"], description=extra["SeriesDescription"],
        image_type=extra["ImageType"], calling_aet=assoc.calling_aet)


def _meta_element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sxxL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(request: StoreRequest, source_aet: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1) for a received data set."""
    elements = (
        _meta_element(2, 0x0001, b"OB", b"\x00\x01")
        + _meta_element(2, 0x0002, b"UI", _even(request.sop_class_uid, b"\x00"))
        + _meta_element(2, 0x0003, b"UI", _even(request.sop_instance_uid, b"\x00"))
        + _meta_element(2, 0x0010, b"UI", _even(request.transfer_syntax, b"\x00"))
        + _meta_element(2, 0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID, b"\x00"))
        + _meta_element(2, 0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME, b" ")))
    if source_aet:
        elements += _meta_element(2, 0x0016, b"AE", _even(source_aet, b" "))
    return b"\x00" * 128 + b"DICM" + _meta_element(2, 0x0000, b"UL", struct.pack("<L", len(elements))) + elements


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
            meta = read_meta(incoming, self.meta_length, self.assoc, self.request)
            spooled = incoming.commit(meta.series_uid, meta.sop_uid)
        except _Reject as rej:
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
            try:
                os.unlink(moved)
            except OSError:
                log.warning("could not remove the replaced copy %s", moved)
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

    def new_session(self) -> StoreSession:
        return StoreSession()

    def accepted(self, assoc: Association[StoreSession]) -> None:
        metrics.association_accepted()

    def rejected(self, address: str, calling_aet: str, reason: str) -> None:
        metrics.rejection(f"association:{reason}")

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
        try:
            if series:
                self.store.mark_released(sorted(series), now=time.time())
        finally:
            self.store.close()  # this association thread's connection: closed now, not when collected

    def aborted(self, assoc: Association[StoreSession]) -> None:
        self._drop_spare(assoc)
        self.store.close()


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


def supported_contexts() -> list[PresentationContext]:
    """Verification and every storage SOP class pynetdicom knows, each in every transfer syntax it knows."""
    contexts = [build_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)]
    contexts += [build_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]
    return contexts


def acceptor_settings(cfg: Config) -> AcceptorSettings:
    node = cfg.node
    return AcceptorSettings(
        ae_title=node.ae_title, allowed_calling_aets=frozenset(node.allowed_calling_aets),
        max_pdu=node.max_pdu_size, acse_timeout=node.acse_timeout, network_timeout=node.network_timeout,
        max_associations=node.max_associations, implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
        # With several receivers on one socket, new associations go to the least busy. When the first receiver to
        # wake took each one, 4 associations on 2 receivers split 3+1 in 2 of 5 runs here, and the 3 then share
        # one process's GIL. (On 2 cores the throughput gain is within the noise; it matters with more cores.)
        yield_per_connection=_YIELD_PER_CONNECTION if cfg.node.receivers > 1 else 0.0)


def _connection_preparer(cfg: Config) -> Any:
    allowed_hosts = frozenset(cfg.node.allowed_hosts)
    ssl_context = server_ssl_context(cfg.node.tls)
    handshake_timeout = cfg.node.acse_timeout

    def prepare(sock: socket.socket, address: tuple[str, int]) -> socket.socket | None:
        if allowed_hosts and address[0] not in allowed_hosts:
            log.warning("connection from %s refused: host not in node.allowed_hosts", address[0])
            metrics.rejection("host-not-allowed")
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is None:
            return sock
        sock.settimeout(handshake_timeout)  # a silent client cannot hold the thread for ever
        try:
            wrapped = ssl_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", address[0], exc)
            metrics.rejection("tls-handshake")
            return None
        wrapped.settimeout(None)
        return wrapped

    return prepare


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
    server = UpperLayerServer(acceptor_settings(cfg), ctx, supported_contexts(), listener or listen(cfg),
                              prepare=_connection_preparer(cfg))
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    log.info("listening as %s on %s:%d", cfg.node.ae_title, cfg.node.host, server.server_address[1])
    return server
