"""Every admin verb against a real running node and its store; JSON outputs parsed and checked.

One node for the module. Routing is by calling AE title: series sent by ``dicomnode send`` (calling AE
DICOMNODE) are forwarded to a DCMTK storescp; series from ``BAD`` go to two pipelines, one whose destination
is down (retryable, QUEUED in backoff) and one whose destination rejects the association (permanent: FAILED).
The quiet period is long, so series complete only through ``dicomnode complete``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.conftest import series_dir
from tests.peers import NodeProcess, StoreSCP, free_port, node_config, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers


class Env:
    def __init__(self, node: NodeProcess, scp: StoreSCP, workdir: Path) -> None:
        self.node, self.scp, self.workdir = node, scp, workdir

    def run(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dicomnode", *args, "-c", str(config or self.node.config_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def json(self, *args: str, code: int = 0) -> Any:
        out = self.run(*args, "--json")
        assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
        return json.loads(out.stdout)


def _uid(folder: Path) -> str:
    first = sorted(p for p in folder.iterdir() if p.is_file())[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("cli")
    scp = StoreSCP(workdir / "scp")
    port = free_port()
    dests = [{"name": "scp", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
             {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
             {"name": "wrongae", "ae_title": "NOBODY", "host": "127.0.0.1", "port": port}]
    cfg = node_config(workdir, node={"port": port}, completion={"quiet_seconds": 3600, "on_release": "off"},
                      worker={"max_attempts": 3, "backoff_seconds": 600, "backoff_max_seconds": 600},
                      destinations=dests,
                      pipelines=[{"name": "fwd", "destinations": ["scp"]},
                                 {"name": "broken", "destinations": ["down"]},
                                 {"name": "refused", "destinations": ["wrongae"]}],
                      rules=[{"name": "good", "pipelines": ["fwd"], "match": {"calling_aet": ["DICOMNODE"]}},
                             {"name": "bad", "pipelines": ["broken", "refused"],
                              "match": {"calling_aet": ["BAD"]}}])
    node = NodeProcess(workdir, cfg).start()
    yield Env(node, scp, workdir)
    node.stop()
    scp.stop()


def test_admin_verbs_end_to_end(env: Env) -> None:
    good, bad = series_dir("P03"), series_dir("P12")
    good_uid, bad_uid = _uid(good), _uid(bad)

    # send: the node's SCU pushes a folder to any AE (here: the node itself), progress bar on stderr.
    out = env.run("send", str(good), "--host", "127.0.0.1", "--port", str(env.node.port), "--aet",
                  "DICOMNODE",
                  "--json")
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert (sent["files"], sent["stored"], sent["failed"], sent["statuses"]) == (28, 28, 0, {"0x0000": 28})
    assert "28/28" in out.stderr
    bad_files = sorted(bad.iterdir())[:5]
    assert stored_count(storescu(env.node.port, bad_files, aet="BAD")) == 5

    status = env.json("status")
    assert status["schema"] == "dicomnode.status/1"
    assert status["counts"]["series"]["RECEIVING"] == 2 and status["queue"]["waiting"] == 0
    assert {s["series_uid"]: s["instances"] for s in status["series"]} == {good_uid: 28, bad_uid: 5}
    listed = env.json("jobs")
    assert listed["schema"] == "dicomnode.jobs/1" and listed["jobs"] == []

    # complete: forced now, routed by the rules; a second time is refused (exit 1).
    done = env.json("complete", good_uid)
    assert done["series"]["state"] == "COMPLETE" and [j["pipeline"] for j in done["jobs"]] == ["fwd"]
    again = env.run("complete", good_uid)
    assert again.returncode == 1 and "only a RECEIVING series" in again.stderr
    assert {j["pipeline"] for j in env.json("complete", bad_uid)["jobs"]} == {"broken", "refused"}

    def jobs_by_pipeline() -> dict[str, dict[str, Any]]:
        return {j["pipeline"]: j for j in env.json("jobs")["jobs"]}

    wait_until(lambda: [jobs_by_pipeline()[p]["state"] for p in ("fwd", "refused")] == ["DONE", "FAILED"]
               and jobs_by_pipeline()["broken"]["attempts"] == 1, 180, "jobs to settle", interval=0.3)
    jobs = jobs_by_pipeline()
    assert jobs["broken"]["state"] == "QUEUED" and jobs["broken"]["deliveries"] == {"PENDING": 5}
    assert jobs["fwd"]["deliveries"] == {"STORED": 28}
    assert len(env.scp.files()) == 28

    # show: a job's outputs with their delivery state and its events; a series with all its jobs.
    shown = env.json("show", str(jobs["fwd"]["id"]))
    assert shown["kind"] == "job" and len(shown["outputs"]) == 28
    assert {d["state"] for o in shown["outputs"] for d in o["deliveries"]} == {"STORED"}
    assert [e["kind"] for e in shown["events"]][-1] == "job.done"
    series_doc = env.json("show", bad_uid)
    assert series_doc["kind"] == "series" and len(series_doc["jobs"]) == 2
    assert any(e["kind"] == "job.failed" and "rejected" in e["message"] for e in series_doc["events"])
    assert "no job 9999" in env.run("show", "9999").stderr and env.run("show", "9999").returncode == 1

    # status: queue and backlog per destination.
    status = env.json("status")
    assert status["backlog"]["down"] == 5 and status["backlog"]["scp"] == 0
    assert status["queue"]["oldest_waiting"]["job_id"] == jobs["broken"]["id"]
    assert status["queue"]["oldest_waiting"]["next_attempt_in_seconds"] > 60

    # jobs filters.
    assert [j["id"] for j in env.json("jobs", "--state", "FAILED")["jobs"]] == [jobs["refused"]["id"]]
    assert len(env.json("jobs", "--since", "1h")["jobs"]) == 3
    assert env.json("jobs", "--since", "2999-01-01T00:00:00")["jobs"] == []

    # cancel and retry, with their refusals.
    assert env.json("cancel", str(jobs["broken"]["id"]))["cancelled"]["state"] == "CANCELLED"
    refused = env.json("cancel", str(jobs["broken"]["id"]), code=1)
    assert "only QUEUED or RUNNING" in refused["error"]
    assert env.json("cancel", "9999", code=1)["error"] == "no job 9999"
    retried = env.json("retry", "--failed")["retried"]
    assert [(j["id"], j["state"], j["attempts"]) for j in retried] == [(jobs["refused"]["id"], "QUEUED", 0)]
    assert env.run("retry", str(jobs["fwd"]["id"])).returncode == 1  # DONE jobs are not retried
    assert env.run("retry").returncode == 2  # neither a job nor --failed

    # purge: the finished series goes (files and rows); the one with undelivered work stays unless forced.
    spool = env.workdir / "data" / "spool"
    purged = env.json("purge", "--older-than", "0s")
    assert [r["series_uid"] for r in purged["removed"]] == [good_uid]
    assert purged["removed"][0]["files"] == 28 and purged["bytes"] > 0
    assert [s["series_uid"] for s in purged["skipped"]] == [bad_uid]
    assert not (spool / good_uid).exists() and (spool / bad_uid).exists()
    assert env.run("show", good_uid).returncode == 1
    forced = env.json("purge", "--older-than", "0s", "--force")
    assert [r["series_uid"] for r in forced["removed"]] == [bad_uid]
    assert env.json("status")["series"] == []


def test_process_verb_writes_outputs(env: Env, tmp_path: Path) -> None:
    out = env.run("process", str(series_dir("P03")), "--pipeline", "fwd", "--out", str(tmp_path / "out"),
                  "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["outputs"]) == 28 == len(list((tmp_path / "out").iterdir()))


def test_errors_have_exit_codes(env: Env, tmp_path: Path) -> None:
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(yaml.safe_dump({"node": {"ae_tilte": "X"}}))
    out = env.run("status", config=bad_cfg)
    assert out.returncode == 2 and "node.ae_tilte" in out.stderr
    missing = tmp_path / "nostore.yaml"
    missing.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "nowhere")}}))
    out = env.run("status", config=missing)
    assert out.returncode == 1 and "no state store" in out.stderr
    unreachable = ("--host", "127.0.0.1", "--port", str(free_port()), "--aet", "NOBODY")
    assert env.run("echo", *unreachable).returncode == 1
    assert env.run("send", str(series_dir("P03")), *unreachable).returncode == 1
    assert env.json("echo", "--host", "127.0.0.1", "--port", str(env.node.port), "--aet", "DICOMNODE")["ok"]


def test_status_watch_repeats(env: Env) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "status", "--json", "--watch", "0.2", "-c",
                             str(env.node.config_path)], stdout=subprocess.PIPE, text=True)
    try:
        docs = [json.loads(proc.stdout.readline()) for _ in range(2)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [d["schema"] for d in docs] == ["dicomnode.status/1"] * 2
    assert docs[1]["generated_at"] > docs[0]["generated_at"]


def test_cli_modules_do_not_import_torch() -> None:
    code = ("import sys, dicomnode.ops.cli, dicomnode.ops.admin, dicomnode.telemetry.metrics; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
