#!/usr/bin/env python3
"""Series per hour through a node on the Ray engine with 1 and with 2 replicas, on Ray's simulated cluster.

One run, one cluster (``ray.cluster_utils.Cluster``: two nodes of one CPU each, with one ``gpu_slot`` standing in
for a GPU, every process on 127.0.0.1), and for each replica count a fresh ``dicomnode serve`` (2 worker
processes, engine ray, the pipeline's replicas each reserving one gpu_slot: so 2 replicas sit on 2 nodes).
Each node first segments one series (cold: actors start and load the model; not counted), then storescu sends
``--jobs`` series (P01 re-sliced to ``--slices`` slices, new UIDs each) back to back. Throughput is counted
from the first of them judged complete to the last job DONE (the node's own state store), as series per hour;
the report is the ratio 2 replicas / 1 replica. Outputs: SEG only, no destination (the PACS is not measured).

Read the ratio with the machine in mind: on this 2-core machine the two "GPU nodes", the receiver and both
workers (volume loading and SEG encoding) share the same two cores, so the ceiling is far below 2.

    python scripts/bench_ray.py [--model lung-unet|lung] [--jobs 4] [--slices 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback stays loopback

from dicomnode.state.store import JobState, Store  # noqa: E402
from scripts.synthetic import resliced_ct  # noqa: E402
from tests.peers import NodeProcess, node_config, stored_count, storescu, wait_until  # noqa: E402

MB = 2**20


def measure(work: Path, address: str, replicas: int, model: str, series: list[tuple[Path, int]]) -> float:
    """Series per hour with ``replicas`` replicas: the first series warms the node up and is not counted."""
    work.mkdir(parents=True, exist_ok=True)
    name = f"{model}-r{replicas}"
    cfg = node_config(work, worker={"engine": "ray", "workers": 2, "device": "cpu"},
                      ray={"address": address, "namespace": "dicomnode-bench", "replicas": replicas,
                           "num_cpus": 1, "resources": {"gpu_slot": 1}},
                      pipelines=[{"name": name, "kind": "segment", "outputs": {"kinds": ["seg"]},
                                  "model": {"kind": model}}],
                      rules=[{"name": "all", "pipelines": [name]}])
    node = NodeProcess(work, cfg).start()
    store = Store(work / "data" / "dicomnode.sqlite3")

    def done(n: int) -> bool:
        jobs = store.list_jobs()
        if any(j.state is JobState.FAILED for j in jobs):
            raise RuntimeError(f"a job failed: {node.log()[-2000:]}")
        return sum(j.state is JobState.DONE for j in jobs) == n

    try:
        (first, count), rest = series[0], series[1:]
        if stored_count(storescu(node.port, [first])) != count:
            raise RuntimeError("warm-up series not stored")
        wait_until(lambda: done(1), 600, "warm-up job", interval=0.2)
        warm = {j.id for j in store.list_jobs()}
        for folder, n in rest:
            if stored_count(storescu(node.port, [folder])) != n:
                raise RuntimeError(f"{folder} not stored")
        wait_until(lambda: done(len(series)), 1800, "jobs", interval=0.2)
        jobs = [j for j in store.list_jobs() if j.id not in warm]
        started = min(next(e.ts for e in store.events(series_uid=j.series_uid) if e.kind == "series.complete")
                      for j in jobs)
        ended = max(j.updated_at for j in jobs)
        nodes = {e.message for j in jobs for e in store.events(job_id=j.id) if e.kind == "job.inference"}
    finally:
        node.stop()
    seconds = ended - started
    used = {json.loads(m)["node_id"][:8] for m in nodes}
    print(f"  {replicas} replica(s): {len(rest)} series in {seconds:.1f} s = {len(rest) * 3600 / seconds:.0f}"
          f" series/h (Ray nodes used: {', '.join(sorted(used))})")
    return len(rest) * 3600 / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lung-unet", choices=["lung-unet", "lung"])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    node_args: dict[str, Any] = {"num_cpus": 1, "resources": {"gpu_slot": 1}, "object_store_memory": 200 * MB,
                 "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args)
    ray.init(address=cluster.address, namespace="dicomnode-bench", log_to_driver=False)
    rates = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            work = Path(tmp)
            print(f"{args.model}, {args.jobs} series of {args.slices} slices after one warm-up series, "
                  f"2 workers, Ray: 2 simulated nodes x (1 CPU, 1 gpu_slot)")
            for replicas in (1, 2):
                series = [(work / f"r{replicas}-s{i}", len(resliced_ct(work / f"r{replicas}-s{i}", args.slices)))
                          for i in range(args.jobs + 1)]
                rates[replicas] = measure(work / f"node-r{replicas}", cluster.address, replicas, args.model, series)
                for name in ray.util.list_named_actors():  # replicas are detached: free their gpu_slots
                    ray.kill(ray.get_actor(name))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"2 replicas / 1 replica = {rates[2] / rates[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
