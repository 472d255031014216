#!/usr/bin/env python3
"""The numbers behind docs/scaling.md that no other script measures: the state store's write rates and the
Ray engine's overhead per job.

1. State store (SQLite, WAL, fsync as configured by SQLite's defaults here): instances recorded per second (one
   transaction per C-STORE, what every receiver process does) and job round trips per second (claim, the
   ``job.inference`` and ``job.stages`` events, outputs ready with ``--outputs`` deliveries, each delivery marked
   stored, finish: the store's side of one segment job), from ``--writers`` processes at once.
2. Ray: a 300 x 512 x 512 float32 volume (300 MiB, the 300-slice CT) from a driver to an actor on the *other*
   node of a simulated two-node cluster and uint8 labels back (``ray.put``, call, ``ray.get``), against the
   same call with a tiny payload (the call's fixed cost). On one machine "the other node" is another raylet and
   object store on loopback: a copy through Ray's object manager, no network.

    python scripts/bench_scaling.py [--writers 2] [--repeats 5] [--instances 3000] [--slices 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback stays loopback

import numpy as np  # noqa: E402

from dicomnode.state import jobs  # noqa: E402
from dicomnode.state.jobs import Backoff, OutboundFile, Route  # noqa: E402
from dicomnode.state.store import DeliveryState, InstanceMeta, Store  # noqa: E402

MB = 2**20


def _meta(series: str, i: int) -> InstanceMeta:
    return InstanceMeta(sop_uid=f"{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
                        study_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1", modality="CT", description="",
                        calling_aet="CT")


def _record(db: Path, writer: int, n: int, out: Any) -> None:
    store = Store(db)
    started = time.perf_counter()
    for i in range(n):
        store.record_instance(_meta(f"9.{writer}", i), Path(f"/spool/{writer}/{i}"), 500_000, now=time.time(),
                              reprocess_late=True)
    out.put(time.perf_counter() - started)


def _jobs(db: Path, writer: int, n: int, outputs: int, out: Any) -> None:
    store = Store(db)
    owner = f"bench:{writer}"
    backoff = Backoff(5, 10, 60)
    started = time.perf_counter()
    for _ in range(n):
        job = jobs.claim(store, owner, now=time.time(), lease_seconds=900)
        if job is None:
            break
        store.add_event("job.inference", '{"engine": "ray"}', series_uid=job.series_uid, job_id=job.id)
        store.add_event("job.stages", "load 1 s, inference 1 s, encode 1 s", series_uid=job.series_uid, job_id=job.id)
        files = [OutboundFile(f"/outbox/{job.id}/{k}", f"{job.id}.{k}", "1.2.840.10008.5.1.4.1.1.66.4",
                              "1.2.840.10008.1.2.1") for k in range(outputs)]
        jobs.add_deliveries(store, job.id, "pacs", files, now=time.time())
        jobs.set_outputs_ready(store, job.id, now=time.time(), message=f"{outputs} object(s)")
        for f in files:
            jobs.mark_delivery(store, job.id, "pacs", f.sop_uid, DeliveryState.STORED, status=0, detail="",
                               now=time.time())
        jobs.finish(store, job, owner, now=time.time(), error=None, backoff=backoff)
    out.put(time.perf_counter() - started)


def _parallel(target: Any, db: Path, writers: int, *args: Any) -> float:
    """Wall seconds for ``writers`` processes running ``target`` at once (the slowest one)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(db, w, *args, out)) for w in range(writers)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def store_rates(writers: int, outputs: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        db = Path(tmp) / "dicomnode.sqlite3"
        Store(db)
        seconds = _parallel(_record, db, writers, n)
        print(f"store: {writers * n / seconds:.0f} instances recorded/s ({writers} writer processes, one"
              f" transaction each)")
        store = Store(db)
        n_jobs = max(n // 10, 1)
        for s in range(writers * n_jobs):
            store.record_instance(_meta(f"8.{s}", 0), Path(f"/spool/j/{s}"), 1, now=0.0, reprocess_late=True)
        jobs.promote(store, lambda row: Route(("p",), "bench"), now=100.0, quiet_seconds=1)
        seconds = _parallel(_jobs, db, writers, n_jobs, outputs)
        print(f"store: {writers * n_jobs / seconds:.0f} segment jobs/s through the store ({writers} workers,"
              f" claim .. finish with {outputs} deliveries each)")


def ray_overhead(repeats: int, slices: int) -> None:
    import ray
    from ray.cluster_utils import Cluster

    node_args: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 1200 * MB, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args, resources={"gpu_slot": 1})  # the actor's node; the driver is on the head
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0, resources={"gpu_slot": 1})
        class Echo:
            def labels(self, volume: np.ndarray) -> np.ndarray:
                return np.zeros(volume.shape, dtype=np.uint8)

        actor = Echo.remote()  # type: ignore[attr-defined]
        small = np.zeros((1, 8, 8), dtype=np.float32)
        big = np.random.default_rng(0).normal(0, 300, (slices, 512, 512)).astype(np.float32)
        ray.get(actor.labels.remote(ray.put(small)))
        rows: dict[str, list[float]] = {"tiny": [], f"{slices}x512x512": []}
        for _ in range(repeats):
            for name, volume in (("tiny", small), (f"{slices}x512x512", big)):
                started = time.perf_counter()
                ray.get(actor.labels.remote(ray.put(volume)))
                rows[name].append(time.perf_counter() - started)
        for name, times in rows.items():
            print(f"ray: put + call on the other node + get, {name}: median {statistics.median(times) * 1000:.0f} ms"
                  f" (min {min(times) * 1000:.0f} ms, {repeats} repeats)")
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--outputs", type=int, default=28, help="deliveries per job (CT300: 28 objects)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--instances", type=int, default=3000, help="instances per writer (jobs: a tenth)")
    parser.add_argument("--slices", type=int, default=300, help="slices of 512x512 float32 sent to Ray")
    args = parser.parse_args()
    store_rates(args.writers, args.outputs, args.instances)
    ray_overhead(args.repeats, args.slices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
