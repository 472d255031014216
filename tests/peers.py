"""Real DICOM peers for the tests: the node itself, DCMTK storescu/storescp/echoscu, and Orthanc.

Every peer listens on a free loopback port and is waited for (never a fixed sleep). DCMTK and Orthanc run with
TCP_NODELAY=1. DCMTK binaries are taken from /usr/bin explicitly: pynetdicom installs Python tools with the
same names (storescu, echoscu, storescp) that may come first on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DCMTK_BIN = Path("/usr/bin")
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        raise FileNotFoundError(f"DCMTK {tool} not installed at {path} (the test command installs dcmtk)")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NodeProcess:
    """``dicomnode serve`` as a child process with a config written from a dict, or (``config=None``) on the
    embedded default with only the ``overrides`` (``--set KEY=VALUE``: ports, quiet period) and its data in
    ``DICOMNODE_HOME`` = ``workdir/home``."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None, *,
                 overrides: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.config = config
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ)
        if config is None:
            self.home = workdir / "home"
            self.env["DICOMNODE_HOME"] = str(self.home)
            sets = {"node.port": free_port(), "ui.port": free_port(), **(overrides or {})}
            self.port = int(sets["node.port"])
            self.ui_port = int(sets["ui.port"])
            self.config_args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        else:
            self.port = int(config["node"]["port"])
            self.ui_port = int(config.get("ui", {}).get("port", 8110))
            self.config_path = workdir / "dicomnode.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
            self.config_args = ["-c", str(self.config_path)]
        self.metrics_url = ""  # set by tests that enable metrics

    def start(self) -> NodeProcess:
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", *self.config_args],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.proc = proc

        def serving() -> bool:  # the supervisor logs it once every receiver process listens
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return b" serving on " in f.read()

        wait_until(lambda: serving() or proc.poll() is not None, 60, "node to serve")
        if proc.poll() is not None:
            raise RuntimeError(f"node exited: {self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """SIGKILL the whole process group: supervisor, receivers and workers die at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", *args, *self.config_args],
                              capture_output=True, text=True, timeout=60, env=self.env)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))


def node_config(workdir: Path, **sections: Any) -> dict[str, Any]:
    """A node config dict on a free port with a quick quiet period; sections override/extend it."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "port": free_port()},
        "storage": {"path": str(workdir / "data"), "min_free_mb": 1},
        "completion": {"quiet_seconds": 1.0},
        "worker": {"poll_seconds": 0.1, "backoff_seconds": 0.5, "backoff_max_seconds": 2.0},
        "ui": {"port": free_port()},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def storescu(port: int, paths: list[Path], *, aec: str = "DICOMNODE", aet: str = "MODALITY",
             extra: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, verbose, scanning folders, one association, proposing each file's own transfer syntax
    (``-R``: without it storescu proposes only uncompressed syntaxes and cannot send compressed files)."""
    args = [dcmtk("storescu"), "-v", "-R", "-aet", aet, "-aec", aec, "+sd", "-nh", *extra, "127.0.0.1", str(port),
            *map(str, paths)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=PEER_ENV)


def stored_count(out: subprocess.CompletedProcess[str]) -> int:
    """How many C-STORE requests storescu saw answered with success (needs -v)."""
    text = out.stdout + out.stderr
    return text.count("Received Store Response (Success)")


class StoreSCP:
    """DCMTK storescp writing everything it receives under ``folder``; ``options`` go before the port
    (default ``+xa``: accept every transfer syntax)."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP", options: tuple[str, ...] = ("+xa",)) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "-uf", *options, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
        wait_until(lambda: port_open(self.port), 20, f"storescp {ae_title} to listen")

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Orthanc:
    """A private Orthanc (Debian package) with its own storage, DICOM and HTTP ports on loopback."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                 dicom_port: int | None = None, dicomweb: bool = False, users: dict[str, str] | None = None) -> None:
        """``dicomweb``: load the DICOMweb plugin (Debian package orthanc-dicomweb), STOW-RS at
        :attr:`dicomweb_url` ``/studies``; ``users``: HTTP basic authentication on, with these users."""
        if shutil.which("Orthanc") is None:
            raise FileNotFoundError("Orthanc not installed (the test command installs the orthanc package)")
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = {
            "Name": f"test-{aet}", "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "Plugins": [],
            "DicomModalities": modalities or {}, "DicomScuTimeout": 30, "HttpTimeout": 60,
            "StableAge": 1,
        }
        if dicomweb:
            if not Path(DICOMWEB_PLUGIN).is_file():
                raise FileNotFoundError(f"{DICOMWEB_PLUGIN} missing (the test command installs orthanc-dicomweb)")
            self.config["Plugins"] = [str(Path(DICOMWEB_PLUGIN).parent)]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.auth: tuple[str, str] | None = None
        if users:
            self.config["AuthenticationEnabled"] = True
            self.config["RegisteredUsers"] = users
            self.auth = next(iter(users.items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(["Orthanc", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env=PEER_ENV, cwd=self.workdir)
        wait_until(self._http_up, 60, "Orthanc HTTP")
        wait_until(lambda: port_open(self.dicom_port), 30, "Orthanc DICOM port")

    def _http_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError((self.workdir / "orthanc.log").read_text(errors="replace")[-2000:])
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            payload = rsp.read()
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(payload) if "json" in ctype else payload

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb services (STOW-RS at ``/studies`` below it)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload_folder(self, folder: Path) -> list[str]:
        """POST every file of a folder to /instances; return the Orthanc instance ids."""
        ids = []
        for path in sorted(folder.iterdir()):
            ids.append(self.request("POST", "/instances", raw=path.read_bytes())["ID"])
        return ids

    def series_with_uid(self, series_uid: str) -> list[str]:
        found = self.request("POST", "/tools/find", {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}})
        return list(found)


class TlsProxy:
    """socat terminating TLS on a free loopback port (``pem``: certificate and key) and forwarding each
    connection to ``target_port`` in the clear: HTTPS in front of a peer that only speaks HTTP.
    (Debian's Orthanc 1.10.1 crashes on its own HTTPS: a segmentation fault at the first handshake.)"""

    def __init__(self, pem: Path, target_port: int) -> None:
        if shutil.which("socat") is None:
            raise FileNotFoundError("socat not installed (the test command installs it)")
        self.port = free_port()
        listen = f"OPENSSL-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,cert={pem},verify=0"
        self.proc = subprocess.Popen(["socat", listen, f"TCP:127.0.0.1:{target_port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 20, "socat TLS proxy to listen")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
