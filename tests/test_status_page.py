"""The status page in a real browser (headless Chromium) against a node that processed a real series.

The node segments P01 with the classical lung pipeline and sends the results to a DCMTK storescp; then
Chromium loads the overview, the series and the job page: the series and its job are DONE, the thumbnails
of the Secondary Captures load and decode, the screenshots are not blank, and no patient identifier is on
any page. A second node binds its page beyond loopback with a token: 401 without it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.config import load_config
from dicomnode.errors import ConfigError
from tests.conftest import series_dir
from tests.peers import NodeProcess, StoreSCP, free_port, node_config, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers
TOKEN = "s3cret-token-for-the-test-0123"


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is required (apt-get install -y chromium; scripts/test.sh installs it)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=timeout)


def dom(url: str) -> str:
    out = chromium("--virtual-time-budget=3000", "--dump-dom", url)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    return out.stdout


def screenshot(url: str, path: Path) -> Image.Image:
    out = chromium("--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=5000",
                   f"--screenshot={path}", url)
    assert out.returncode == 0 and path.is_file(), out.stderr[-2000:]
    return Image.open(path).convert("RGB")


def assert_not_blank(image: Image.Image) -> None:
    pixels = np.asarray(image).reshape(-1, 3)
    assert image.size == (1280, 900)
    assert len(np.unique(pixels, axis=0)) > 50 and float(pixels.std()) > 10.0


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return rsp.status, rsp.headers.get("Content-Type", ""), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("page")
    scp = StoreSCP(workdir / "scp")
    cfg = node_config(workdir, destinations=[{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1",
                                              "port": scp.port}],
                      pipelines=[{"name": "lung", "kind": "segment", "destinations": ["pacs"],
                                  "model": {"kind": "lung"}}],
                      rules=[{"name": "ct", "pipelines": ["lung"], "match": {"modality": ["CT"]}}],
                      ui={"port": free_port(), "refresh_seconds": 30})
    node = NodeProcess(workdir, cfg).start()
    try:
        assert stored_count(storescu(node.port, [series_dir("P01")])) == 64
        wait_until(lambda: [s["state"] for s in node.status()["series"]] == ["DONE"], 240, "the job", interval=0.5)
        yield node, f"http://127.0.0.1:{node.ui_port}", workdir
    finally:
        node.stop()
        scp.stop()


def test_page_shows_the_series_its_job_and_the_pictures(done: Any) -> None:
    node, base, workdir = done
    (series,) = node.status()["series"]
    first = pydicom.dcmread(sorted(series_dir("P01").iterdir())[0], stop_before_pixels=True)
    identifiers = [str(first.PatientName), str(first.PatientID)]
    identifiers += [part for part in str(first.PatientName).split("^") if len(part) > 2]

    overview = dom(base + "/")
    assert series["series_uid"] in overview and "DONE" in overview
    job_id = int(re.findall(r'href="/jobs/(\d+)"', overview)[0])
    assert re.search(rf'href="/jobs/{job_id}">job {job_id}</a>', overview)
    assert "HEALTHY" in overview and "worker-0" in overview and "receiver-0" in overview

    page = dom(f"{base}/jobs/{job_id}")
    assert "DONE" in page and "Right lung" in page and "Left lung" in page
    assert re.search(r"\d{3,4}\.\d mL", page), "the SR's volumes"
    for kind in ("SEG", "SR", "SC"):
        assert f">{kind}<" in page
    thumbs = re.findall(rf'src="(/jobs/{job_id}/outputs/[0-9.]+\.png)"', page)
    assert len(thumbs) == 18  # 16 overlays, three planes, 3D surface
    for src in thumbs:
        status, ctype, body = get(base + src)
        assert status == 200 and ctype == "image/png"
        picture = Image.open(io.BytesIO(body))
        picture.load()
        assert max(picture.size) == 320 and np.asarray(picture).std() > 5
    series_page = dom(f"{base}/series/{series['series_uid']}")
    assert "series.complete" in series_page and f"job {job_id}" in series_page
    for text in (overview, page, series_page):
        for ident in identifiers:
            assert ident not in text

    for name, url in (("overview", base + "/"), ("job", f"{base}/jobs/{job_id}")):
        shot = screenshot(url, workdir / f"{name}.png")
        assert_not_blank(shot)
    assert get(base + "/jobs/999999")[0] == 404
    assert get(f"{base}/jobs/{job_id}/outputs/1.2.3.png")[0] == 404
    assert get(base + "/static/style.css")[0] == 200
    full = Image.open(io.BytesIO(get(base + thumbs[0] + "?size=1600")[2]))
    assert max(full.size) > 320


def test_show_lists_outputs_by_kind(done: Any) -> None:
    node, _, _ = done
    job = node.status()["series"][0]
    shown = json.loads(node.cli("show", job["series_uid"], "--json").stdout)
    (job_doc,) = shown["jobs"]
    kinds = sorted(o["kind"] for o in job_doc["outputs"])
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and kinds.count("SC") == 18
    assert re.search(rf"INFO .*job {job_doc['id']}: results for pacs \(STORESCP@127\.0\.0\.1:\d+\): 20 STORED",
                     node.log())
    text = node.cli("show", str(job_doc["id"])).stdout
    assert re.search(r"SEG: 1 object\(s\).*SR: 1 object\(s\).*SC: 18 object\(s\)", text, re.DOTALL), text


def test_patient_ids_only_when_configured(done: Any) -> None:
    from starlette.testclient import TestClient

    from dicomnode.ops.web.app import make_app

    node, _, _ = done
    cfg = load_config(node.config_path)
    first = pydicom.dcmread(sorted(series_dir("P01").iterdir())[0], stop_before_pixels=True)
    hidden = TestClient(make_app(cfg)).get("/")
    assert hidden.status_code == 200 and str(first.PatientID) not in hidden.text
    shown_cfg = dataclasses.replace(cfg, ui=dataclasses.replace(cfg.ui, show_patient_ids=True))
    shown = TestClient(make_app(shown_cfg)).get("/")
    assert str(first.PatientID) in shown.text


def test_beyond_loopback_the_page_needs_its_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ui.token: required"):
        from dicomnode.config import parse_config

        parse_config({"ui": {"host": "0.0.0.0"}})
    cfg = node_config(tmp_path, worker={"workers": 0}, ui={"host": "0.0.0.0", "port": free_port(), "token": TOKEN})
    node = NodeProcess(tmp_path, cfg).start()
    try:
        base = f"http://127.0.0.1:{node.ui_port}"
        assert get(base + "/")[0] == 401
        assert get(base + "/static/style.css")[0] == 401
        assert get(base + "/", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert get(base + "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
        assert get(base + "/", {"Authorization": f"Basic {basic}"})[0] == 200
        refused = chromium("--dump-dom", base + "/")  # Chromium gives up on the basic-auth challenge
        assert "Overview" not in refused.stdout
        page = dom(f"{base}/?token={TOKEN}")
        assert "Overview" in page and "no series received yet" in page
        assert_not_blank(screenshot(f"{base}/?token={TOKEN}", tmp_path / "token.png"))
        health = node.cli("health", "--json")  # the verb sends the configured token
        assert health.returncode == 0 and json.loads(health.stdout)["healthy"], health.stdout
    finally:
        node.stop()


def test_health_verb_follows_the_config(done: Any) -> None:
    node, base, _ = done
    out = node.cli("health", "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["schema"] == "dicomnode.health/1" and doc["healthy"]
    assert doc["checked"] == f"{base}/health" and doc["detail"]["workers"][0]["alive"]
    assert get(base + "/health")[0] == 200
    echo = json.loads(node.cli("health", "--json", "--set", "ui.enabled=false").stdout)
    assert echo["healthy"] and echo["checked"] == f"c-echo DICOMNODE@127.0.0.1:{node.port}"
    down = node.cli("health", "--set", f"ui.port={free_port()}", "--timeout", "2")
    assert down.returncode == 1 and down.stdout.startswith("NOT healthy"), down.stdout


def test_status_page_port_in_use_fails_serve(tmp_path: Path) -> None:
    import socket
    import sys

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        node = NodeProcess(tmp_path, node_config(tmp_path, worker={"workers": 0}, ui={"port": port}))
        out = subprocess.run([sys.executable, "-m", "dicomnode", "serve", *node.config_args], capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 1 and f"status page: cannot listen on 127.0.0.1:{port} (ui.port)" in out.stderr
