"""Demo without Docker: a private Orthanc (Debian package) and dicomnode on free loopback ports.

Uploads a CT series (``../shared/data`` P01, or a generated phantom when absent) to Orthanc, asks Orthanc to
send it to the node (the node's rule runs the classical lung pipeline and sends SEG/SR/SC back to Orthanc),
waits for the job, prints where to look, and keeps both running until Ctrl+C, which stops everything.

    python scripts/demo.py [--workdir DIR] [--pipeline forward|segment]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def http(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=300) as rsp:
        return json.loads(rsp.read() or b"null")


def write_phantom(folder: Path, slices: int = 40, size: int = 128) -> Path:
    """A synthetic chest CT (body ellipse of soft tissue, two air-filled lungs), one file per slice."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    lungs = ((np.abs(xx) - 0.18) / 0.13) ** 2 + (yy / 0.22) ** 2 < 1
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for i in range(slices):
        hu = np.where(body, 40, -1000).astype(np.int16)
        if 5 <= i < slices - 5:
            hu[lungs & body] = -850
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "PHANTOM^DEMO", "DEMO"
        ds.Modality, ds.SeriesDescription = "CT", "phantom"
        ds.ImageType, ds.SeriesNumber, ds.InstanceNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], 1, i + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-160, -160, 2.5 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.5, 2.5], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu.tobytes()
        ds.save_as(folder / f"{i + 1:03d}.dcm", enforce_file_format=True)
    return folder


def sample_series(workdir: Path) -> Path:
    found = sorted(SHARED.glob("P01_*"))
    return found[0] if found else write_phantom(workdir / "phantom")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="Orthanc's and the node's data (default: a temp dir)")
    parser.add_argument("--pipeline", choices=["segment", "forward"], default="segment")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnode-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    node_port, metrics_port, o_dicom, o_http, ui_port = (free_port() for _ in range(5))
    orthanc_cfg = {
        "Name": "dicomnode-demo", "DicomAet": "ORTHANC", "DicomPort": o_dicom, "HttpPort": o_http,
        "StorageDirectory": str(workdir / "orthanc" / "storage"), "IndexDirectory": str(workdir / "orthanc"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "Plugins": [],
        "DicomModalities": {"node": ["DICOMNODE", "127.0.0.1", node_port]},
    }
    (workdir / "orthanc").mkdir(exist_ok=True)
    (workdir / "orthanc.json").write_text(json.dumps(orthanc_cfg, indent=2))
    pipe: dict[str, Any] = {"name": "demo", "kind": args.pipeline, "destinations": ["orthanc"]}
    if args.pipeline == "segment":
        pipe["model"] = {"kind": "lung"}
    node_cfg = {
        "node": {"ae_title": "DICOMNODE", "port": node_port},
        "storage": {"path": str(workdir / "node"), "min_free_mb": 64},
        "completion": {"quiet_seconds": 3, "on_release": "evidence"},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": o_dicom}],
        "pipelines": [pipe], "rules": [{"name": "ct", "pipelines": ["demo"], "match": {"modality": ["CT"]}}],
        "metrics": {"enabled": True, "port": metrics_port},
        "ui": {"port": ui_port},
    }
    config = workdir / "dicomnode.yaml"
    config.write_text(yaml.safe_dump(node_cfg))
    procs = [
        subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], env=ENV, cwd=workdir,
                         stdout=open(workdir / "orthanc.log", "ab"), stderr=subprocess.STDOUT),  # noqa: SIM115
        subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "-c", str(config)], cwd=REPO,
                         stdout=open(workdir / "node.log", "ab"), stderr=subprocess.STDOUT),  # noqa: SIM115
    ]
    try:
        wait(lambda: http(o_http, "GET", "/system"), 60, "Orthanc")
        def node_listens() -> bool:
            socket.create_connection(("127.0.0.1", node_port), timeout=0.5).close()
            return True

        wait(node_listens, 60, "node")
        series = sample_series(workdir)
        print(f"uploading {series.name} to Orthanc ...")
        ids = [http(o_http, "POST", "/instances", raw=p.read_bytes())["ParentSeries"]
               for p in sorted(series.iterdir()) if p.is_file()]
        print(f"asking Orthanc to send series {ids[0]} to the node ...")
        http(o_http, "POST", "/modalities/node/store", {"Resources": [ids[0]], "Synchronous": True})
        status = [sys.executable, "-m", "dicomnode", "status", "-c", str(config)]

        def finished() -> bool:
            out = subprocess.run([*status, "--json"], capture_output=True, text=True, cwd=REPO)
            doc = json.loads(out.stdout)
            return any(s["state"] in ("DONE", "FAILED", "IGNORED") for s in doc["series"])

        wait(finished, 600, "the node to process the series")
        subprocess.run(status, cwd=REPO)
        print(f"\nstatus page:      http://127.0.0.1:{ui_port}/")
        print(f"Orthanc Explorer: http://127.0.0.1:{o_http}/app/explorer.html  (outputs are in the study)")
        print(f"node status:      {' '.join(status)}")
        base = f"http://127.0.0.1:{metrics_port}"
        print(f"metrics, health:  {base}/metrics  {base}/health")
        print(f"logs, data:       {workdir}\n\nCtrl+C stops Orthanc and the node.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
