"""Helpers for the receiver's tests: an in-process SCP (as a receiver process runs it), hand-made PDUs and
DIMSE command sets for what no well-behaved peer sends, and counters of what a receiver holds (descriptors,
threads, temporary spool files)."""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from dicomnode.config import parse_config
from dicomnode.ops.service import open_spool
from dicomnode.receive.dimse import decode_command
from dicomnode.receive.scp import ReceiveContext, start_server
from dicomnode.state.store import Store
from tests.peers import node_config


class Scp:
    """The node's Storage SCP in this process, on a free port, with its own spool and state store."""

    def __init__(self, workdir: Path, storage: dict[str, Any] | None = None, **node: Any) -> None:
        storage = {"path": str(workdir / "data"), "min_free_mb": 1, "fsync": True, **(storage or {})}
        self.cfg = parse_config(node_config(workdir, node=node, storage=storage))
        self.store = Store(self.cfg.db_path)
        self.spool = open_spool(self.cfg)
        self.server = start_server(self.cfg, ReceiveContext(self.cfg, self.spool, self.store))
        self.port = self.server.server_address[1]

    def files(self) -> list[Path]:
        return sorted(p for p in self.cfg.spool_dir.rglob("*") if p.is_file())

    def temporary_files(self) -> list[Path]:
        return [p for p in self.files() if p.name.startswith(".tmp-")]

    def instances(self) -> int:
        return sum(s.n_instances for s in self.store.list_series())

    def send(self, ds: Any) -> int:
        """C-STORE ``ds`` over one association from pynetdicom's SCU (its own SOP class and transfer syntax);
        the response status."""
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()


def open_descriptors() -> list[str]:
    """What this process's file descriptors point at (files, sockets, pipes)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed while listing (the listing's own descriptor)
    return out


def association_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("assoc-")]


def associate_rq(contexts: Sequence[tuple[int, str, str]], max_pdu: int = 16384, calling: str = "RAWPEER",
                 called: str = "DICOMNODE", extra: list[Any] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU, encoded by pynetdicom (the reference codec); ``extra``: more user information
    items (pynetdicom primitives: role selection, user identity, ...)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    items = []
    for cid, abstract, ts in contexts:
        cx = build_context(abstract, [ts])
        cx.context_id = cid
        items.append(cx)
    primitive.presentation_context_definition_list = items
    length, impl = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = max_pdu
    impl.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [length, impl, *(extra or [])]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def raw_associate(port: int, contexts: Sequence[tuple[int, str, str]], max_pdu: int = 16384) -> socket.socket:
    """Open an association with hand-made bytes; returns the socket after reading the A-ASSOCIATE-AC."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(contexts, max_pdu))
    pdu_type, _ = read_pdu(sock)
    if pdu_type != 0x02:
        sock.close()
        raise AssertionError(f"expected A-ASSOCIATE-AC, got 0x{pdu_type:02X}")
    return sock


def rejection(port: int, rq: bytes) -> tuple[int, int, int] | None:
    """Send ``rq``; (result, source, reason) of the A-ASSOCIATE-RJ that answers it, None when accepted.

    Rejections are checked on the wire, not with pynetdicom's requestor: when the A-ASSOCIATE-RJ comes back
    faster than its association thread looks at the connection, pynetdicom reports an abort (its DUL has
    already closed the socket after the reject, and the thread reads that as a failed connection).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq)
        pdu_type, body = read_pdu(sock)
        if pdu_type == 0x02:
            return None
        if pdu_type != 0x03:
            raise AssertionError(f"expected A-ASSOCIATE-AC or -RJ, got 0x{pdu_type:02X}")
        return body[1], body[2], body[3]


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exactly(sock, 6)
    pdu_type, length = struct.unpack(">BxL", header)
    return pdu_type, recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def uid_bytes(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return raw + (b"\x00" if len(raw) % 2 else b"")


def command(field: int, message_id: int, sop_class: str | bytes, sop_instance: str | bytes = "",
            data: bool = False) -> bytes:
    """A DIMSE request command set, encoded by hand (implicit VR little endian, group 0000, tags ascending);
    UIDs given as bytes go on the wire as they are (for malformed ones)."""
    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, elem, len(value)) + value

    body = element(0x0002, uid_bytes(sop_class)) + element(0x0100, struct.pack("<H", field))
    body += element(0x0110, struct.pack("<H", message_id))
    body += element(0x0800, struct.pack("<H", 0x0000 if data else 0x0101))
    if sop_instance:
        body += element(0x1000, uid_bytes(sop_instance))
    return element(0x0000, struct.pack("<L", len(body))) + body


def status_of(pdu_body: bytes) -> int:
    """The Status (0000,0900) of the one-PDV command PDU body ``pdu_body`` (a P-DATA-TF)."""
    return int(struct.unpack("<H", decode_command(pdu_body[6:])[0x00000900])[0])


RQ_HEADER = b"\x01\x00\x00\x00\x10\x00"  # A-ASSOCIATE-RQ of 4096 bytes, which never come whole


def slow_connection(port: int, first: bytes) -> socket.socket:
    """A TCP connection to the node that has sent ``first`` and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(first)
    return sock


class Trickler:
    """``n`` connections made by ``connect()`` (plain or TLS) that each go on sending ``payload`` one byte a
    second, then zeros; records when the node closes each one (seconds after it connected)."""

    def __init__(self, connect: Callable[[], socket.socket], n: int, payload: bytes) -> None:
        self.payload = payload
        self.opened: dict[socket.socket, float] = {}
        self.closed_after: list[float] = []
        self._selector = selectors.DefaultSelector()
        for _ in range(n):
            connected = time.monotonic()
            sock = connect()
            sock.setblocking(False)
            self.opened[sock] = connected
            self._selector.register(sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_byte, sent = time.monotonic() + 1.0, 0
        while self.opened and not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                self._check(key.fileobj)  # type: ignore[arg-type]
            if time.monotonic() >= next_byte:
                byte = self.payload[sent:sent + 1] or b"\x00"
                next_byte, sent = next_byte + 1.0, sent + 1
                for sock in list(self.opened):
                    try:
                        sock.send(byte)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        pass
                    except OSError:
                        self._closed(sock)

    def _check(self, sock: socket.socket) -> None:
        try:
            if sock.recv(64):
                return  # an A-ABORT or A-ASSOCIATE-RJ: the close follows
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except OSError:
            pass
        self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        if sock in self.opened:
            self.closed_after.append(time.monotonic() - self.opened.pop(sock))
            self._selector.unregister(sock)
            sock.close()

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        for sock in list(self.opened):
            sock.close()
