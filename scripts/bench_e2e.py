#!/usr/bin/env python3
"""Time from "series complete" to "last derived object acknowledged by the PACS", with a real Orthanc.

For P01 (64 slices) and a 300-slice chest CT (P01 re-sliced, real anatomy), storescu sends the series to a
running dicomnode whose pipeline segments the lungs and sends SEG, SR and SC to Orthanc. The times come from
the node's own state store: the ``series.complete`` event and the last delivery acknowledgement, so the quiet
period and the sending of the input are not counted. Stage times (load, inference, encode) come from the
job's ``job.stages`` event. Reported separately: the first job of a freshly started node (cold) and the jobs
after it (a running node: what every series but the first after a restart sees).

    python scripts/bench_e2e.py [--model lung|lung-unet] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.state.store import JobRow, Store  # noqa: E402
from scripts.synthetic import P01, resliced_ct  # noqa: E402
from tests.peers import NodeProcess, Orthanc, node_config, stored_count, storescu, wait_until  # noqa: E402


@dataclass(frozen=True)
class JobTimes:
    """The newest job's times from the node's own store: its series judged complete, its last object
    acknowledged by the destination (Unix seconds), and its ``job.stages`` event."""

    job: JobRow
    complete: float
    last_ack: float
    stages: str


def newest_job_times(store: Store) -> JobTimes:
    job = store.list_jobs()[0]  # newest first
    complete = next(e.ts for e in store.events(series_uid=job.series_uid) if e.kind == "series.complete")
    last_ack = max(d.updated_at for d in store.deliveries(job.id))
    stages = next(e.message for e in store.events(job_id=job.id) if e.kind == "job.stages")
    return JobTimes(job, complete, last_ack, stages)


def run_node(work: Path, series: list[tuple[Path, int]], model: str) -> list[tuple[float, str]]:
    """Send each series in turn to one running node; per series: (complete -> last ack seconds, stage times).

    The first series is the node's first job after start (cold: imports, first touches of memory); the
    following ones show the steady state of a running node.
    """
    pacs = Orthanc(work / "orthanc")
    cfg = node_config(work, destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "port": pacs.dicom_port}],
                      pipelines=[{"name": "lung", "kind": "segment", "destinations": ["pacs"],
                                  "model": {"kind": model}}],
                      rules=[{"name": "ct", "pipelines": ["lung"]}], completion={"quiet_seconds": 1.0})
    node = NodeProcess(work, cfg).start()
    store = Store(work / "data" / "dicomnode.sqlite3")
    results = []
    try:
        for done, (folder, count) in enumerate(series, start=1):
            sent = storescu(node.port, [folder])
            if stored_count(sent) != count:
                raise RuntimeError(sent.stderr[-500:])
            def all_done(n: int = done) -> bool:
                return bool(node.status()["counts"]["jobs"]["DONE"] == n)

            wait_until(all_done, 600, "job done", interval=0.2)
            times = newest_job_times(store)
            results.append((times.last_ack - times.complete, times.stages))
    finally:
        node.stop()
        pacs.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lung", help="segmenter kind (lung = classical, lung-unet = trained)")
    parser.add_argument("--repeat", type=int, default=2, help="300-slice series sent after the first one")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        thin = [work / f"ct300-{i}" for i in range(args.repeat + 1)]
        for folder in thin:
            resliced_ct(folder, 300)  # the same anatomy, a new series (new UIDs) each time
        p01 = run_node(work / "p01", [(P01, 64)], args.model)
        ct = run_node(work / "ct300", [(folder, 300) for folder in thin], args.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nseries complete -> last object acknowledged by Orthanc (model {args.model}, CPU)")
    print(f"  P01 64x512x512, first job of a fresh node    {p01[0][0]:6.2f} s   ({p01[0][1]})")
    print(f"  CT 300x512x512, first job of a fresh node    {ct[0][0]:6.2f} s   ({ct[0][1]})")
    warm = [seconds for seconds, _ in ct[1:]]
    print(f"  CT 300x512x512, running node, median of {len(warm)}  {statistics.median(warm):6.2f} s   ({ct[-1][1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
