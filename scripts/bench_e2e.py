#!/usr/bin/env python3
"""Time from "series complete" to "last derived object acknowledged by the PACS", with a real Orthanc.

For P01 (64 slices) and a 300-slice chest CT (P01 re-sliced, real anatomy), storescu sends the series to a
running dicomnode whose pipeline segments the lungs and sends SEG, SR and SC to Orthanc. The times come from
the node's own state store: the ``series.complete`` event and the last delivery acknowledgement, so the quiet
period and the sending of the input are not counted. Stage times (load, inference, encode) come from the
job's ``job.stages`` event.

    python scripts/bench_e2e.py [--model lung|lung-unet] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.store import Store  # noqa: E402
from scripts.synthetic import P01, resliced_ct  # noqa: E402
from tests.peers import NodeProcess, Orthanc, node_config, stored_count, storescu, wait_until  # noqa: E402


def run_once(work: Path, series: Path, count: int, model: str) -> tuple[float, str]:
    pacs = Orthanc(work / "orthanc")
    cfg = node_config(work, destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "port": pacs.dicom_port}],
                      pipelines=[{"name": "lung", "kind": "segment", "destinations": ["pacs"],
                                  "model": {"kind": model}}],
                      rules=[{"name": "ct", "pipelines": ["lung"]}], completion={"quiet_seconds": 1.0})
    node = NodeProcess(work, cfg).start()
    try:
        sent = storescu(node.port, [series])
        if stored_count(sent) != count:
            raise RuntimeError(sent.stderr[-500:])
        wait_until(lambda: node.status()["counts"]["jobs"]["DONE"] == 1, 600, "job done", interval=0.2)
        store = Store(work / "data" / "dicomnode.sqlite3")
        (job,) = store.list_jobs()
        complete = next(e.ts for e in store.events(series_uid=job.series_uid) if e.kind == "series.complete")
        last_ack = max(d.updated_at for d in store.deliveries(job.id))
        stages = next(e.message for e in store.events(job_id=job.id) if e.kind == "job.stages")
        return last_ack - complete, stages
    finally:
        node.stop()
        pacs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lung", help="segmenter kind (lung = classical, lung-unet = trained)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        thin = work / "ct300"
        resliced_ct(thin, 300)
        rows = []
        for name, folder, count in (("P01 64x512x512", P01, 64), ("CT 300x512x512", thin, 300)):
            times, stages = [], ""
            for r in range(args.repeat):
                run_dir = work / f"run-{count}-{r}"
                run_dir.mkdir()
                seconds, stages = run_once(run_dir, folder, count, args.model)
                times.append(seconds)
                shutil.rmtree(run_dir, ignore_errors=True)
            rows.append((name, statistics.median(times), stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nseries complete -> last object acknowledged by Orthanc (model {args.model}, CPU,"
          f" median of {args.repeat})")
    for name, seconds, stages in rows:
        print(f"  {name:<16} {seconds:6.2f} s   ({stages})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
