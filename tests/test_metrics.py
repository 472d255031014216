"""Metrics and health over HTTP from a real ``dicomnode serve`` after a real DCMTK send."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dicomnode.ops import http
from dicomnode.telemetry import metrics
from tests.conftest import series_dir
from tests.peers import (
    PEER_ENV,
    NodeProcess,
    StoreSCP,
    dcmtk,
    free_port,
    node_config,
    port_open,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.peers


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.fixture
def node(tmp_path: Path) -> Any:
    """A node that forwards everything to a DCMTK storescp, with metrics on a free port."""
    scp = StoreSCP(tmp_path / "scp")
    port = free_port()
    cfg = node_config(tmp_path, node={"allowed_calling_aets": ["MODALITY"]},
                      metrics={"enabled": True, "port": port}, worker={"workers": 1},
                      completion={"quiet_seconds": 0.5},
                      destinations=[{"name": "scp", "ae_title": "STORESCP", "host": "127.0.0.1",
                                     "port": scp.port}],
                      pipelines=[{"name": "fwd", "kind": "forward", "destinations": ["scp"]}],
                      rules=[{"name": "all", "pipelines": ["fwd"]}])
    n = NodeProcess(tmp_path, cfg).start()
    wait_until(lambda: port_open(port), 30, "metrics port")
    n.metrics_url = f"http://127.0.0.1:{port}"
    yield n
    n.stop()
    scp.stop()


def test_counts_after_a_real_send_and_a_rejected_caller(node: Any) -> None:
    folder = series_dir("P03")
    sent = len([p for p in folder.iterdir() if p.is_file()])
    out = storescu(node.port, [folder])
    assert out.returncode == 0, out.stderr
    rejected = subprocess.run([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1",
                               str(node.port)], capture_output=True, text=True, env=PEER_ENV, timeout=30)
    assert rejected.returncode != 0
    # The series completes after its quiet period and is forwarded to storescp.
    wait_until(lambda: node.status()["counts"]["series"]["DONE"] == 1, 60, "series forwarded")

    code, text = _get(node.metrics_url + "/metrics")
    assert code == 200
    s = _samples(text)
    assert s["dicomnode_instances_received_total"] == sent
    assert s["dicomnode_received_bytes_total"] > 0
    assert s["dicomnode_associations_total"] >= 1
    assert s['dicomnode_rejections_total{reason="association:calling-ae-title-not-recognised"}'] == 1
    assert s["dicomnode_series_completed_total"] == 1
    assert s['dicomnode_series{state="DONE"}'] == 1
    assert s['dicomnode_jobs{state="DONE"}'] == 1 and s['dicomnode_jobs{state="QUEUED"}'] == 0
    assert s['dicomnode_jobs_finished_total{state="DONE"}'] == 1
    assert s['dicomnode_send_results_total{outcome="stored"}'] == sent
    for stage in ("receive_to_complete", "queue_wait", "send"):
        assert s[f'dicomnode_stage_seconds_count{{stage="{stage}"}}'] == 1, stage
    assert s['dicomnode_stage_seconds_sum{stage="receive_to_complete"}'] > 0


def test_health_reports_children_and_503_when_one_dies(node: Any) -> None:
    code, body = _get(node.metrics_url + "/health")
    doc = json.loads(body)
    assert code == 200 and doc["healthy"] is True
    assert [c["alive"] for c in doc["receivers"]] == [True] and [c["alive"] for c in doc["workers"]] == [True]
    # Kill the worker and poll health quickly: 503 until the supervisor has restarted it.
    os.kill(doc["workers"][0]["pid"], signal.SIGKILL)
    seen: list[int] = []

    def unhealthy_then_restarted() -> bool:
        code, body = _get(node.metrics_url + "/health")
        seen.append(code)
        d = json.loads(body)
        return 503 in seen and code == 200 and d["workers"][0]["restarts"] == 1

    wait_until(unhealthy_then_restarted, 30, "worker restart seen in /health", interval=0.02)
    assert _get(node.metrics_url + "/nothing")[0] == 404


EXIT_LINE = re.compile(r"^(\S+ \S+) ERROR MainProcess dicomnode\.ops\.service: worker-0 exited with code (-?\d+)"
                       r" after [\d.]+ s; restart (\d+) in ([\d.]+) s$", re.M)


def test_a_crash_looping_worker_is_restarted_with_backoff_logged_and_shown_on_health(tmp_path: Path) -> None:
    """A worker that dies at start-up (here: its lock folder is blocked by a file) is restarted after 0.5, 1, 2,
    4 ... s, one log line per restart with the exit code and the delay; /health says 503 with the restart count,
    the last exit code and the next restart time; once the cause is gone the worker serves and health is 200."""
    port = free_port()
    cfg = node_config(tmp_path, metrics={"enabled": True, "port": port}, worker={"workers": 1})
    blocker = tmp_path / "data" / "workers"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")  # the worker cannot create its liveness lock: it exits with code 1
    node = NodeProcess(tmp_path, cfg).start()
    try:
        wait_until(lambda: port_open(port), 30, "metrics port")
        wait_until(lambda: len(EXIT_LINE.findall(node.log())) >= 4, 60, "four worker exits")
        exits = EXIT_LINE.findall(node.log())
        assert [(code, n, delay) for _, code, n, delay in exits[:4]] == [
            ("1", "1", "0.5"), ("1", "2", "1.0"), ("1", "3", "2.0"), ("1", "4", "4.0")]
        stamps = [datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f") for ts, _, _, _ in exits[:4]]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
        assert all(gap >= float(exits[i][3]) for i, gap in enumerate(gaps)), gaps  # it waited as it said
        code, body = _get(f"http://127.0.0.1:{port}/health")
        doc = json.loads(body)
        (worker,) = doc["workers"]
        assert code == 503 and doc["healthy"] is False
        assert worker["restarts"] >= 3 and worker["last_exit_code"] == 1
        if not worker["alive"]:  # waiting for its next start (not caught in the second it takes to start)
            assert worker["next_restart_at"] > time.time() - 1
        blocker.unlink()  # the operator fixes the cause: the next restart succeeds

        def serving() -> bool:
            code, body = _get(f"http://127.0.0.1:{port}/health")
            w = json.loads(body)["workers"][0]
            return code == 200 and w["alive"] and w["next_restart_at"] is None

        wait_until(serving, 60, "worker serving after the fix")
        (worker,) = json.loads(_get(f"http://127.0.0.1:{port}/health")[1])["workers"]
        assert worker["last_exit_code"] == 1 and worker["restarts"] == len(EXIT_LINE.findall(node.log()))
    finally:
        node.stop()


def test_stage_timer_and_observe_stage_in_process(tmp_path: Path) -> None:
    """Without a multiprocess directory the functions record in-process; unknown stages are refused."""
    from dicomnode.state.store import Store

    Store(tmp_path / "db.sqlite3")
    with metrics.stage_timer("inference"):
        pass
    metrics.observe_stage("encode", 0.25)
    with pytest.raises(ValueError):
        metrics.observe_stage("nap", 1.0)
    s = _samples(http.render(tmp_path / "db.sqlite3").decode())
    assert s['dicomnode_stage_seconds_count{stage="inference"}'] >= 1
    assert s['dicomnode_stage_seconds_sum{stage="encode"}'] >= 0.25


def test_json_log_lines_carry_job_and_series_context_only() -> None:
    import logging

    from dicomnode.ops.logs import JsonFormatter, context_logger

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("dicomnode.test.logs")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    context_logger(logger, job_id=7, series_uid="1.2.3").info("sent", extra={"PatientName": "DOE^JOHN"})
    doc = json.loads(JsonFormatter().format(records[0]))
    assert (doc["message"], doc["job_id"], doc["series_uid"]) == ("sent", 7, "1.2.3")
    assert "PatientName" not in doc and "DOE" not in json.dumps(doc)
    with pytest.raises(ValueError):
        context_logger(logger, patient_id="x")
