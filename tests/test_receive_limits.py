"""What a peer can make a receiver spend (issue 16, fault 3), measured on a real receiver process: hundreds of
connections trickling one byte at a time before they associate, an association trickling inside a PDU. The
receiver's memory and thread count stay bounded, the deadlines close them however the bytes trickle, and a real
DCMTK storescu send goes through meanwhile."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from tests.conftest import series_dir
from tests.peers import NodeProcess, node_config, stored_count, storescu, wait_until
from tests.scp_peer import RQ_HEADER, Trickler, raw_associate, read_pdu, slow_connection

pytestmark = pytest.mark.peers

SLOW_CONNECTIONS = 300
ARTIM = 4.0


def _receiver_pid(node_pid: int) -> int:
    """The receiver process (a multiprocessing child of the supervisor running spawn_main)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == node_pid and b"spawn_main" in cmdline:
            return int(entry)
    raise LookupError("no receiver process")


def _rss_mb_and_threads(pid: int) -> tuple[float, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def test_hundreds_of_slow_connections_are_bounded_and_closed_by_the_deadline(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path, node={"acse_timeout": ARTIM, "network_timeout": 10},
                                             worker={"workers": 0})).start()
    try:
        out = storescu(node.port, [next(series_dir("P01").iterdir())])  # warm up: every import done
        assert out.returncode == 0, out.stderr
        receiver = _receiver_pid(node.proc.pid)  # type: ignore[union-attr]
        rss0, threads0 = _rss_mb_and_threads(receiver)
        start = time.monotonic()
        trickler = Trickler(lambda: slow_connection(node.port, RQ_HEADER[:1]), SLOW_CONNECTIONS, RQ_HEADER[1:])
        peak: list[tuple[float, int]] = []
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set():
                peak.append(_rss_mb_and_threads(receiver))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent = storescu(node.port, [series_dir("P03")])  # a real send while the slow connections are held
        sent_after = time.monotonic() - start
        trickler.wait(ARTIM + 10)
        sampler_stop.set()
        sampler.join()
    finally:
        node.stop()
    assert sent.returncode == 0 and stored_count(sent) == 28, sent.stderr
    assert sent_after < ARTIM, "the send did not wait for the slow connections' deadline"
    assert len(trickler.closed_after) == SLOW_CONNECTIONS and not trickler.opened
    assert max(trickler.closed_after) < ARTIM + 1.5, "every slow connection closed by its deadline"
    rss = max(r for r, _ in peak)
    threads = max(t for _, t in peak)
    print(f"receiver: {rss0:.0f} -> peak {rss:.0f} MB, {threads0} -> peak {threads} threads;"
          f" {SLOW_CONNECTIONS} slow connections closed after {min(trickler.closed_after):.2f}"
          f"-{max(trickler.closed_after):.2f} s; storescu done after {sent_after:.2f} s")
    assert rss - rss0 < 40, f"receiver memory grew from {rss0:.0f} to {rss:.0f} MB"
    assert threads - threads0 <= 4, f"receiver threads grew from {threads0} to {threads}"


def test_an_association_trickling_inside_a_pdu_is_aborted_at_the_network_deadline(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path, node={"network_timeout": 2.0})).start()
    try:
        with raw_associate(node.port, [(1, CTImageStorage, ImplicitVRLittleEndian)]) as sock:
            # P-DATA-TF of 4096 bytes, one PDV: a command fragment of 4088 bytes, which come one every 0.5 s
            sock.sendall(b"\x04\x00\x00\x00\x10\x00" + b"\x00\x00\x0f\xfa\x01\x01")
            start = time.monotonic()
            sock.settimeout(0.5)
            answer: Any = None
            while time.monotonic() - start < 15 and answer is None:
                try:
                    sock.sendall(b"\x00")
                    answer = read_pdu(sock)
                except TimeoutError:
                    continue
                except OSError as exc:
                    answer = exc
            elapsed = time.monotonic() - start
        assert answer == (0x07, b"\x00\x00\x00\x00"), answer  # A-ABORT, a local decision (service user)
        assert 1.5 < elapsed < 3.5, elapsed
        wait_until(lambda: "network timeout: no progress" in node.log(), 5, "the reason in the log")
    finally:
        node.stop()


@pytest.mark.parametrize(("key", "value"), [("max_pending_connections", 0), ("acse_timeout", 0),
                                            ("network_timeout", -1)])
def test_limits_are_checked_at_start_up(tmp_path: Path, key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"node.{key}"):
        parse_config(node_config(tmp_path, node={key: value}))
