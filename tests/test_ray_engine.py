"""The Ray engine on Ray's own multi-node simulation, with a real node (``serve``) and a real Orthanc as the PACS.

One :class:`ray.cluster_utils.Cluster` for the module: two nodes, each with one CPU and one ``gpu_slot`` (a custom
resource standing in for a GPU), every Ray process on 127.0.0.1. Ray resolves a loopback address to the
machine's outward IP unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when Ray is imported); the fixture sets
it for this process and the node's processes, so everything stays on loopback. The tests that need no cluster
(the slot gate, the local engine without Ray, an unreachable cluster) run first and in their own processes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicomnode.inference.loaders import save_torchscript
from dicomnode.inference.replica import Gate
from dicomnode.inference.spec import PreprocessSpec
from scripts.synthetic import resliced_ct
from tests.peers import NodeProcess, Orthanc, free_port, node_config, stored_count, storescu, wait_until

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "dicomnode-test"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
MB = 2**20


# ------------------------------------------------------------------------------------------- no cluster


def test_gate_hands_out_each_slot_once_takes_turns_and_waits_bounded() -> None:
    async def scenario() -> None:
        gate = Gate(replicas=2, hold_seconds=60)
        first, second = await gate.acquire("w1", 1), await gate.acquire("w2", 1)
        assert first is not None and second is not None and {first, second} == {0, 1}
        started = time.monotonic()
        assert await gate.acquire("w3", 0.3) is None  # both busy: a bounded wait, then None
        assert 0.25 < time.monotonic() - started < 2
        waiter = asyncio.ensure_future(gate.acquire("w3", 5))
        await asyncio.sleep(0.1)
        await gate.release(first, "not-the-holder")  # ignored
        assert not waiter.done()
        await gate.release(first, "w1")
        assert await waiter == first
        await gate.release(first, "w3")
        await gate.release(second, "w2")
        # one job at a time alternates between the replicas (the slot released longest ago goes first)
        turns = []
        for _ in range(4):
            slot = await gate.acquire("w", 1)
            assert slot is not None
            turns.append(slot)
            await gate.release(slot, "w")
        assert turns in ([0, 1, 0, 1], [1, 0, 1, 0])

    asyncio.run(scenario())


def test_gate_takes_back_a_slot_whose_holder_died() -> None:
    async def scenario() -> None:
        gate = Gate(replicas=1, hold_seconds=0.2)
        assert await gate.acquire("dead-worker", 1) == 0
        assert await gate.acquire("w", 2) == 0  # after hold_seconds the slot is free again
        assert await gate.holders() == {0: "w"}

    asyncio.run(scenario())


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)})


def test_the_local_engine_never_imports_ray(tmp_path: Path) -> None:
    """The embedded default and a local-engine segment pipeline: a worker built, a series segmented, no Ray."""
    out = _python(f"""
        import sys
        from pathlib import Path
        from dicomnode.config import parse_config
        from dicomnode.imaging.volume import load_series
        from dicomnode.ops.service import check_engine, make_worker
        from dicomnode.work.segment import Segmenters
        from scripts.synthetic import resliced_ct
        check_engine(parse_config(None))
        cfg = parse_config({{"storage": {{"path": "{tmp_path}/data"}},
                            "pipelines": [{{"name": "lung", "kind": "segment", "model": {{"kind": "lung"}}}}]}})
        check_engine(cfg)
        make_worker(cfg)
        labels, where = Segmenters(cfg).segment(cfg.pipelines[0], load_series(resliced_ct(Path("{tmp_path}/s"), 12)))
        print(where.engine, int(labels.data.max()), "ray" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    engine, top_label, imported = out.stdout.split()[-3:]
    assert (engine, imported) == ("local", "False") and int(top_label) >= 2  # both lungs found, Ray never imported


def test_an_unreachable_cluster_is_a_start_up_error_and_later_a_wait(tmp_path: Path) -> None:
    port = free_port()
    cfg = node_config(tmp_path, worker={"engine": "ray", "workers": 1},
                      ray={"address": f"127.0.0.1:{port}", "connect_timeout_seconds": 2},
                      pipelines=[{"name": "lung", "kind": "segment"}], rules=[{"name": "all", "pipelines": ["lung"]}])
    node = NodeProcess(tmp_path, cfg)
    with pytest.raises(RuntimeError, match=f"Ray cluster at 127.0.0.1:{port} is unreachable"):
        node.start()
    assert node.proc is not None and node.proc.wait(10) == 1
    # In a running worker the same is EngineUnavailable: retryable, and the attempt does not count.
    out = _python(f"""
        from pathlib import Path
        from dicomnode.config import parse_config
        from dicomnode.errors import EngineUnavailable
        from dicomnode.imaging.volume import load_series
        from dicomnode.work.segment import Segmenters
        from scripts.synthetic import resliced_ct
        cfg = parse_config({{"worker": {{"engine": "ray"}}, "ray": {{"address": "127.0.0.1:{port}"}},
                            "pipelines": [{{"name": "lung", "kind": "segment"}}]}})
        try:
            Segmenters(cfg).segment(cfg.pipelines[0], load_series(resliced_ct(Path("{tmp_path}/s"), 8)))
        except EngineUnavailable as exc:
            print(exc.retryable, exc.counts_attempt, exc)
    """, **LOOPBACK_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(f"True False Ray cluster at 127.0.0.1:{port} is unreachable"), out.stdout


# ------------------------------------------------------------------------------------------- the cluster


class SlowPointwise(nn.Module):
    """Voxel-wise random logits after ``rounds`` matrix products: an inference long enough to be killed."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 1)
        self.weight = nn.Parameter(torch.randn(192, 192) / 14.0)
        self.rounds = rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.eye(192)
        for _ in range(self.rounds):
            h = torch.tanh(h @ self.weight)
        out: torch.Tensor = self.conv(x) + 0.0 * h.mean()
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in LOOPBACK_ENV.items():
            env.setenv(key, value)
        import ray
        from ray.cluster_utils import Cluster

        if ray._private.ray_constants.ENABLE_RAY_CLUSTER:  # imported before the fixture set the variable
            pytest.fail("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set")
        node_args: dict[str, Any] = {"num_cpus": 1, "resources": {"gpu_slot": 1}, "object_store_memory": 200 * MB,
                     "node_ip_address": "127.0.0.1"}
        sim = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        sim.add_node(**node_args)
        ray.init(address=sim.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            yield {"address": sim.address, "nodes": {n["NodeID"] for n in ray.nodes() if n["Alive"]}}
        finally:
            ray.shutdown()
            sim.shutdown()


@pytest.fixture(scope="module")
def node(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Orthanc]]:
    work = tmp_path_factory.mktemp("ray-node")
    model = work / "slow.pt"
    spec = PreprocessSpec(target_spacing_mm=(16.0, 16.0, 16.0), window_low=-1000.0, window_high=400.0,
                          patch_size=(16, 32, 32), label_values=(1, 2), label_names=("Right lung", "Left lung"))
    save_torchscript(model, torch.jit.script(SlowPointwise(rounds=4000).eval()), spec, name="slow", version="1")
    pacs = Orthanc(work / "orthanc")
    cfg = node_config(
        work, worker={"engine": "ray", "workers": 2, "device": "cpu"},
        # Each node has one gpu_slot: the two lung replicas (0.6 each) cannot share a node, and the one slow
        # replica (0.4) fits beside either, whatever order Ray places them in.
        ray={"address": cluster["address"], "namespace": NAMESPACE, "replicas": 2, "num_cpus": 0.5,
             "resources": {"gpu_slot": 0.6}},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        pipelines=[{"name": "lung", "kind": "segment", "destinations": ["pacs"], "outputs": {"kinds": ["seg"]}},
                   {"name": "slow", "kind": "segment", "destinations": ["pacs"], "outputs": {"kinds": ["seg"]},
                    "model": {"kind": "torchscript", "path": str(model)},
                    "ray": {"replicas": 1, "resources": {"gpu_slot": 0.4}}}],
        rules=[{"name": "slow", "pipelines": ["slow"], "match": {"series_description": "^slow"}},
               {"name": "lung", "pipelines": ["lung"], "match": {"series_description": "^resliced"}}],
        metrics={"enabled": True, "port": free_port()},
    )
    with pytest.MonkeyPatch.context() as env:
        for key, value in LOOPBACK_ENV.items():
            env.setenv(key, value)
        running = NodeProcess(work, cfg).start()
    running.metrics_url = f"http://127.0.0.1:{cfg['metrics']['port']}"
    try:
        yield running, pacs
    finally:
        running.stop()
        pacs.stop()


def _send(node: NodeProcess, folder: Path, count: int) -> None:
    sent = storescu(node.port, [folder])
    assert stored_count(sent) == count, sent.stderr[-2000:]


def _jobs(node: NodeProcess) -> list[dict[str, Any]]:
    out = node.cli("jobs", "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["jobs"])


def _wait_done(node: NodeProcess, pipeline: str, count: int, timeout: float = 180) -> list[dict[str, Any]]:
    def done() -> bool:
        jobs = [j for j in _jobs(node) if j["pipeline"] == pipeline]
        assert not [j for j in jobs if j["state"] == "FAILED"], node.log()[-3000:]
        return sum(j["state"] == "DONE" for j in jobs) == count

    wait_until(done, timeout, f"{count} {pipeline} job(s) DONE", interval=0.5)
    return [j for j in _jobs(node) if j["pipeline"] == pipeline]


def test_jobs_spread_over_both_nodes_and_say_where_they_ran(node: tuple[NodeProcess, Orthanc],
                                                            cluster: dict[str, Any], tmp_path: Path) -> None:
    running, pacs = node
    for i in range(2):
        _send(running, tmp_path / f"s{i}", len(resliced_ct(tmp_path / f"s{i}", 12)))
    jobs = _wait_done(running, "lung", 2)
    places = [j["inference"] for j in jobs]
    assert all(p["engine"] == "ray" and p["node_ip"] == "127.0.0.1" and p["wait_seconds"] >= 0 for p in places)
    assert {p["node_id"] for p in places} == cluster["nodes"]  # one job on each simulated GPU node
    assert len({p["actor_id"] for p in places}) == 2 and {p["replica"] for p in places} == {0, 1}
    show = running.cli("show", str(jobs[0]["id"]))
    assert "inference on Ray node 127.0.0.1" in show.stdout and "waiting" in show.stdout
    with urllib.request.urlopen(running.metrics_url + "/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    assert 'dicomnode_inference_runs_total{engine="ray",node="127.0.0.1"} 2.0' in text
    assert 'dicomnode_stage_seconds_count{stage="replica_wait"} 2.0' in text
    assert len(pacs.get("/instances")) == 2  # one SEG per series


def _replica_segmenting() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Replica.segment"):
                return True
        except OSError:
            continue
    return False


def test_a_replica_killed_mid_job_makes_a_retryable_attempt_and_the_job_ends_done_once(
        node: tuple[NodeProcess, Orthanc], tmp_path: Path) -> None:
    import ray

    running, pacs = node
    before = len(pacs.get("/instances"))
    paths = resliced_ct(tmp_path / "slow", 12)
    for path in paths:  # routed to the slow pipeline by its description
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = f"slow {ds.SeriesDescription}"
        ds.save_as(path)
    _send(running, tmp_path / "slow", len(paths))
    gates: list[str] = []

    def gate_held() -> bool:
        gates[:] = [n for n in ray.util.list_named_actors() if n.startswith("slow.") and n.endswith(".gate")]
        return bool(gates) and bool(ray.get(ray.get_actor(gates[0]).holders.remote()))

    wait_until(gate_held, 120, "the slow job to hold a replica", interval=0.05)
    slot: int = next(iter(ray.get(ray.get_actor(gates[0]).holders.remote())))
    # Killed once the call runs inside the replica (Ray titles the actor's process "ray::Replica.segment" while
    # it executes): a kill before the call arrives would only delay it to the restarted actor, a retry of
    # nothing. The inference then lasts seconds (thousands of matrix products per patch).
    wait_until(_replica_segmenting, 120, "the replica to run the slow job", interval=0.02)
    victim = ray.get_actor(gates[0].removesuffix(".gate") + f".replica-{slot}")
    ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts -1)
    (job,) = _wait_done(running, "slow", 1, timeout=240)
    assert job["attempts"] == 2 and job["deliveries"] == {"STORED": 1}
    shown = json.loads(running.cli("show", str(job["id"]), "--json").stdout)
    retried = [e["message"] for e in shown["events"] if e["kind"] == "job.queued" and "retry" in e["message"]]
    assert len(retried) == 1 and "attempt 1 failed (retryable)" in retried[0] and "replica" in retried[0]
    assert [e["kind"] for e in shown["events"]].count("job.inference") == 1  # only the attempt that finished
    instances = pacs.get("/instances")
    assert len(instances) == before + 1  # the SEG once: no duplicate from the killed attempt


def test_the_engine_returns_the_local_labels_and_a_new_configuration_retires_the_old_replicas(
        cluster: dict[str, Any], tmp_path: Path) -> None:
    import ray

    from dicomnode.config import RayConfig, RayPlacement
    from dicomnode.imaging.volume import load_series
    from dicomnode.inference.remote import RayEngine
    from dicomnode.inference.segmenter import ClassicalSegmenter, build_segmenter

    volume = load_series(resliced_ct(tmp_path / "s", 10))
    engine = RayEngine(RayConfig(address=cluster["address"], namespace=NAMESPACE), "test")
    place = RayPlacement(replicas=1, num_gpus=0.0, num_cpus=0.0, resources={})
    builder = functools.partial(build_segmenter, "lung")
    labels, where = engine.segment("retire", place, builder, "v1", volume)
    assert np.array_equal(labels.data, ClassicalSegmenter.lung().segment(volume).data)
    assert where.engine == "ray" and where.node_id in cluster["nodes"] and where.replica == 0
    other = RayEngine(RayConfig(address=cluster["address"], namespace=NAMESPACE), "test")
    other.pool("retire.v2", place, builder, "v1")  # another pipeline whose name starts the same way

    def named(prefix: str) -> set[str]:
        return {n for n in ray.util.list_named_actors() if n.startswith(prefix)}

    old = named("retire.") - named("retire.v2.")
    assert len(old) == 2  # the gate and one replica
    RayEngine(RayConfig(address=cluster["address"], namespace=NAMESPACE), "test").pool("retire", place, builder, "v2")
    wait_until(lambda: not (named("retire.") & old), 30, "the old configuration's actors to go")
    assert len(named("retire.") - named("retire.v2.")) == 2 and len(named("retire.v2.")) == 2
