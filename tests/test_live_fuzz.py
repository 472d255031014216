"""A bounded live fuzz run: random mutations of a valid association (A-ASSOCIATE-RQ, a C-STORE of a real
image, A-RELEASE-RQ) sent to a running node, several at a time. Afterwards the receiver process holds no more
descriptors or threads than before, no temporary spool file is left, and a real send still succeeds."""

from __future__ import annotations

import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.receive.pdu import pdata_pdus
from tests.conftest import series_dir
from tests.peers import NodeProcess, node_config, stored_count, storescu, wait_until
from tests.scp_peer import associate_rq, command
from tests.test_receive_faults import _implicit
from tests.test_receive_limits import _receiver_pid, _rss_mb_and_threads

pytestmark = pytest.mark.peers

MUTATIONS = 400
SEED = 16


def _valid_association() -> bytes:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    stream = associate_rq([(1, CTImageStorage, ImplicitVRLittleEndian), (3, Verification, ImplicitVRLittleEndian)])
    stream += b"".join(pdata_pdus(1, command(0x0001, 1, CTImageStorage, ds.SOPInstanceUID, data=True), True, 0))
    stream += b"".join(pdata_pdus(1, _implicit(ds), False, 4096))
    stream += b"".join(pdata_pdus(3, command(0x0030, 2, Verification), True, 0))
    return stream + b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _mutate(stream: bytes, rng: random.Random) -> bytes:
    data = bytearray(stream)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data))
        kind = rng.randrange(5)
        if kind == 0:  # flip a byte, more often in the headers at the front
            data[min(where, rng.randrange(400))] = rng.randrange(256)
        elif kind == 1:
            data[where:where] = rng.randbytes(rng.randint(1, 16))
        elif kind == 2:
            del data[where:where + rng.randint(1, 64)]
        elif kind == 3:
            del data[where:]
        else:
            data[where:where] = data[max(0, where - 200):where]
    return bytes(data)


def _send(port: int, data: bytes, rng: random.Random) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            i = 0
            while i < len(data):
                step = rng.choice((7, 100, 4096, 65536))
                sock.sendall(data[i:i + step])
                i += step
            sock.settimeout(0.3)
            while sock.recv(65536):  # whatever the node answers, until it closes or goes quiet
                pass
    except OSError:
        pass  # reset, refused, timed out: the node is allowed to cut a broken peer off


CONCURRENCY = 8


def _receiver_state(pid: int) -> tuple[int, int, int]:
    """(descriptors other than the state store's, the state store's, threads) of the receiver. SQLite keeps
    the descriptor of a connection closed while another connection of the process holds a lock (in WAL mode the
    receiver's main connection always does) and reuses it at the next open: the store's count follows the most
    connections open at once, never the number of associations (connections left open would add one each)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    store = sum(1 for t in targets if t.endswith(".sqlite3"))
    return len(targets) - store, store, _rss_mb_and_threads(pid)[1]


def test_mutated_associations_leave_the_node_serving_with_nothing_leaked(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path, node={"acse_timeout": 2, "network_timeout": 2},
                                             worker={"workers": 0}, completion={"quiet_seconds": 600})).start()
    try:
        warm = storescu(node.port, sorted(series_dir("P03").iterdir())[:2])
        assert warm.returncode == 0, warm.stderr
        receiver = _receiver_pid(node.proc.pid)  # type: ignore[union-attr]
        fds0, store0, threads0 = _receiver_state(receiver)
        valid = _valid_association()
        rng = random.Random(SEED)
        cases = [(_mutate(valid, rng), random.Random(rng.random())) for _ in range(MUTATIONS)]
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            list(pool.map(lambda case: _send(node.port, *case), cases))
        fuzz_seconds = time.monotonic() - start

        def settled() -> bool:
            fds, store, threads = _receiver_state(receiver)
            return fds <= fds0 and store <= store0 + CONCURRENCY and threads <= threads0

        try:
            wait_until(settled, 10, "the receiver back to its descriptors and threads")  # ARTIM closes the rest
        except TimeoutError:
            held = sorted(os.readlink(f"/proc/{receiver}/fd/{fd}") for fd in os.listdir(f"/proc/{receiver}/fd"))
            raise AssertionError(f"receiver holds {_receiver_state(receiver)} (descriptors, store descriptors,"
                                 f" threads), was {(fds0, store0, threads0)}: {held}") from None
        spool = tmp_path / "data" / "spool"
        leftovers = list(spool.rglob(".tmp-*")) + list((spool / ".incoming").glob("*"))
        sent = storescu(node.port, [series_dir("P03")])
        wait_until(lambda: not list(spool.rglob(".tmp-*")), 5, "the last association's spare file removed")
    finally:
        node.stop()
    print(f"{MUTATIONS} mutated associations in {fuzz_seconds:.1f} s; receiver back to {fds0} descriptors"
          f" (+{store0} to the state store), {threads0} threads")
    assert sent.returncode == 0 and stored_count(sent) == 28, sent.stderr
    assert leftovers == []
    assert "Traceback" not in node.log()
