"""DICOM TLS with certificates made here by openssl: DCMTK echoscu/storescu against the node's SCP, and the
node's SCU (``dicomnode send`` and a forward pipeline) against a TLS storescp."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from tests.conftest import series_dir
from tests.peers import (
    PEER_ENV,
    NodeProcess,
    StoreSCP,
    dcmtk,
    node_config,
    stored_count,
    wait_until,
)
from tests.scp_peer import RQ_HEADER, Trickler, slow_connection

pytestmark = pytest.mark.peers


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server and a client certificate signed by it, and a self-signed (untrusted) client."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=dicomnode test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


def tls_store_scp(folder: Path, certs: Path) -> StoreSCP:
    """DCMTK storescp speaking TLS only, requiring a client certificate signed by the test CA."""
    return StoreSCP(folder, "TLSSCP", options=("+tls", str(certs / "server.key"), str(certs / "server.crt"),
                                                "+cf", str(certs / "ca.crt")))


@pytest.fixture(scope="module")
def tls_env(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("tls")
    scp = tls_store_scp(workdir / "scp", certs)
    tls = {"enabled": True, "cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key"),
           "ca_file": str(certs / "ca.crt")}
    cfg = node_config(workdir, node={"tls": tls}, completion={"quiet_seconds": 0.5},
                      destinations=[{"name": "tlsscp", "ae_title": "TLSSCP", "host": "127.0.0.1",
                                     "port": scp.port, "tls": True}],
                      pipelines=[{"name": "fwd", "destinations": ["tlsscp"]}],
                      rules=[{"name": "all", "pipelines": ["fwd"], "match": {"calling_aet": ["MODALITY"]}}])
    node = NodeProcess(workdir, cfg).start()
    yield node, scp
    node.stop()
    scp.stop()


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-v", "-aet", "MODALITY", "-aec", "DICOMNODE", *args],
                          capture_output=True, text=True, timeout=60, env=PEER_ENV)


def test_echo_needs_tls_and_a_trusted_certificate(tls_env: Any, certs: Path) -> None:
    node, _ = tls_env
    peer = ("127.0.0.1", str(node.port))
    trusted = ("+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf", str(certs / "ca.crt"))
    assert _dcmtk("echoscu", *trusted, *peer).returncode == 0
    assert _dcmtk("echoscu", *peer).returncode != 0  # plain TCP to a TLS port
    rogue = ("+tls", str(certs / "rogue.key"), str(certs / "rogue.crt"), "+cf", str(certs / "ca.crt"))
    assert _dcmtk("echoscu", *rogue, *peer).returncode != 0  # client certificate not signed by the CA
    untrusting = ("+tls", str(certs / "client.key"), str(certs / "client.crt"))  # does not trust our CA
    assert _dcmtk("echoscu", *untrusting, *peer).returncode != 0
    assert _dcmtk("echoscu", *trusted, *peer).returncode == 0  # and the node keeps serving
    assert "TLS handshake with 127.0.0.1 failed" in node.log()


def test_store_over_tls_is_received_and_forwarded_over_tls(tls_env: Any, certs: Path) -> None:
    node, scp = tls_env
    files = sorted(series_dir("P03").iterdir())[:6]
    args = ["+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf", str(certs / "ca.crt"),
            "127.0.0.1", str(node.port), *map(str, files)]
    out = _dcmtk("storescu", *args)
    assert out.returncode == 0 and stored_count(out) == 6, out.stderr
    plain = _dcmtk("storescu", "127.0.0.1", str(node.port), str(files[0]))
    assert plain.returncode != 0 and stored_count(plain) == 0
    # The forward pipeline's destination has tls: true: the node's SCU presents its certificate to storescp.
    wait_until(lambda: len(scp.files()) == 6, 60, "forward over TLS")
    assert node.status()["counts"]["series"]["DONE"] == 1


def test_cli_send_and_echo_over_tls(tls_env: Any) -> None:
    node, scp = tls_env
    base = [sys.executable, "-m", "dicomnode"]
    where = ["--host", "127.0.0.1", "--port", str(scp.port), "--aet", "TLSSCP",
             "-c", str(node.config_path)]
    echo = subprocess.run([*base, "echo", *where, "--tls", "--json"], capture_output=True, text=True,
                          timeout=60)
    assert echo.returncode == 0 and json.loads(echo.stdout)["ok"], echo.stderr
    assert subprocess.run([*base, "echo", *where], capture_output=True, timeout=60).returncode == 1  # no TLS
    files = sorted(series_dir("P12").iterdir())[:3]
    sent = subprocess.run([*base, "send", *map(str, files), *where, "--tls", "--json"], capture_output=True,
                          text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["stored"] == 3


def test_require_client_cert_without_ca_file_is_a_start_up_error(certs: Path, tmp_path: Path) -> None:
    """A node asked to require client certificates but given no CA to verify them against would accept
    any caller (ssl cannot verify without trust anchors): refused when the config is read, before serving."""
    tls = {"enabled": True, "cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key")}
    with pytest.raises(ConfigError, match="node.tls.require_client_cert: needs node.tls.ca_file"):
        parse_config({"node": {"tls": {**tls, "require_client_cert": True}}})
    with pytest.raises(ConfigError, match="node.tls.require_client_cert"):
        parse_config({"node": {"tls": tls}})  # true is the default
    assert parse_config({"node": {"tls": {**tls, "require_client_cert": False}}}).node.tls.ca_file is None
    node = NodeProcess(tmp_path, node_config(tmp_path, node={"tls": {**tls, "require_client_cert": True}}))
    with pytest.raises(RuntimeError, match="require_client_cert"):
        node.start()  # `dicomnode serve` exits at start-up and says why


ARTIM = 4.0
# A TLS record header announcing a 512-byte handshake message (a ClientHello), whose body never comes whole.
CLIENT_HELLO_HEADER = b"\x16\x03\x01\x02\x00\x01"


def test_tls_peers_trickling_the_handshake_or_the_request_are_closed_by_the_deadline(certs: Path,
                                                                                      tmp_path: Path) -> None:
    """ARTIM is a deadline from the moment of connection, TLS or not (issue 16, fault 3): peers that trickle
    their ClientHello, or finish the handshake and then trickle the A-ASSOCIATE-RQ inside TLS, are closed by
    it, and a real storescu send over TLS goes through while they are held."""
    tls = {"enabled": True, "cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key"),
           "ca_file": str(certs / "ca.crt")}
    node = NodeProcess(tmp_path, node_config(tmp_path, node={"tls": tls, "acse_timeout": ARTIM,
                                                             "network_timeout": 10},
                                             worker={"workers": 0})).start()
    client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    client.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))

    def handshaken() -> socket.socket:
        sock = client.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=5),
                                  server_hostname="127.0.0.1")
        sock.sendall(RQ_HEADER[:1])
        return sock

    files = sorted(series_dir("P03").iterdir())[:6]
    trusted = ("+tls", str(certs / "client.key"), str(certs / "client.crt"), "+cf", str(certs / "ca.crt"))
    try:
        start = time.monotonic()
        hello = Trickler(lambda: slow_connection(node.port, CLIENT_HELLO_HEADER[:1]), 40, CLIENT_HELLO_HEADER[1:])
        inside = Trickler(handshaken, 20, RQ_HEADER[1:])
        out = _dcmtk("storescu", *trusted, "127.0.0.1", str(node.port), *map(str, files))
        sent_after = time.monotonic() - start
        hello.wait(ARTIM + 10)
        inside.wait(ARTIM + 10)
    finally:
        node.stop()
    assert out.returncode == 0 and stored_count(out) == 6, out.stderr
    assert sent_after < ARTIM, "the send did not wait for the slow connections' deadline"
    for trickler, n in ((hello, 40), (inside, 20)):
        assert len(trickler.closed_after) == n and not trickler.opened
        assert max(trickler.closed_after) < ARTIM + 1.5, "every slow connection closed by its deadline"
        assert min(trickler.closed_after) > ARTIM - 0.5, "closed by the deadline, not at once"
