#!/usr/bin/env python3
"""Does a running model slow receiving? Ingest rate of one node with and without a heavy job running.

One dicomnode (1 receiver process, 1 worker process, the lung U-Net pipeline by default). First the ingest
rate of a 300-slice series while the worker is idle; then a series is made complete so a job starts, and
while that job is RUNNING the same ingest is measured again. Receivers and workers are separate processes,
so on a machine with cores to spare the two rates should be close; on a 2-core machine they compete for CPU
and the ratio shows how much.

    python scripts/bench_ingest_under_load.py [--model lung-unet] [--slices 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.state.store import JobState, Store  # noqa: E402
from scripts.bench_ingest import Receiver, generate_series, send  # noqa: E402
from scripts.synthetic import resliced_ct  # noqa: E402
from tests.peers import NodeProcess, node_config, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lung-unet")
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        heavy = work / "heavy"
        resliced_ct(heavy, args.slices)
        probe_a, probe_b = work / "probe-a", work / "probe-b"
        generate_series(probe_a, args.slices)
        generate_series(probe_b, args.slices)
        cfg = node_config(work, completion={"quiet_seconds": 2.0},
                          pipelines=[{"name": "seg", "kind": "segment", "dry_run": True,
                                      "model": {"kind": args.model}}],
                          rules=[{"name": "heavy", "pipelines": ["seg"],
                                  "match": {"series_description": "^resliced"}}])
        node = NodeProcess(work, cfg).start()
        store = Store(work / "data" / "dicomnode.sqlite3")
        assert node.proc is not None
        receiver = Receiver(node.port, "DICOMNODE", node.proc.pid, lambda: None)
        try:
            idle = args.slices / send(receiver, [probe_a], work).seconds
            send(receiver, [heavy], work)
            wait_until(lambda: any(j.state is JobState.RUNNING for j in store.list_jobs()), 120, "job running")
            busy = args.slices / send(receiver, [probe_b], work).seconds
            still_running = any(j.state is JobState.RUNNING for j in store.list_jobs())
        finally:
            node.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ningest of {args.slices} slices, 1 association, instances/s:")
    print(f"  worker idle            {idle:7.0f}")
    print(f"  {args.model} job running {busy:7.0f}   (job still running at the end: {still_running})")
    print(f"  ratio busy/idle        {busy / idle:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
