#!/usr/bin/env python3
"""What a radiologist waits for: last instance acknowledged -> last result acknowledged by the PACS.

storescu sends P01 (64 slices) and a 300-slice chest CT (P01 re-sliced, real anatomy) to a node running the
classical lung pipeline, whose SEG, SR and Secondary Captures go to a real Orthanc. Measured twice in one
run: with completion on evidence at the sender's release (the default) and with the rule off (the quiet
period alone decides, ``--quiet-seconds``, default 30 s as the node's default). Times come from the node's
state store: the series' last instance recorded (the row is written just before its C-STORE success goes
out) and the last delivery acknowledged by Orthanc; stage times from the job's ``job.stages`` event.

    python scripts/bench_latency.py [--series p01,ct300] [--quiet-seconds 30]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.state.store import Store  # noqa: E402
from scripts.bench_e2e import newest_job_times  # noqa: E402
from scripts.synthetic import P01, resliced_ct  # noqa: E402
from tests.peers import NodeProcess, Orthanc, node_config, stored_count, storescu, wait_until  # noqa: E402


@dataclass(frozen=True)
class Latency:
    series: str
    rule: str
    seconds: float  # last instance recorded -> last result acknowledged
    complete_after: float  # last instance recorded -> series judged complete
    stages: str


def run(work: Path, rule: str, quiet: float, series: list[tuple[str, Path, int]]) -> list[Latency]:
    """One node with ``completion.on_release = rule``; each series sent in turn over one association."""
    pacs = Orthanc(work / "orthanc")
    cfg = node_config(work, destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "port": pacs.dicom_port}],
                      pipelines=[{"name": "lung", "kind": "segment", "destinations": ["pacs"],
                                  "model": {"kind": "lung"}}],
                      rules=[{"name": "ct", "pipelines": ["lung"]}],
                      completion={"quiet_seconds": quiet, "on_release": rule},
                      worker={"poll_seconds": 0.5})  # the node's default (the tests' configs poll faster)
    node = NodeProcess(work, cfg).start()
    # the steady state of a running node: its worker has imported the pipeline's modules (a fresh node's
    # first series waits for that once; scripts/bench_e2e.py reports that case)
    wait_until(lambda: "worker 0 ready" in node.log(), 120, "worker ready")
    store = Store(work / "data" / "dicomnode.sqlite3")
    out = []
    try:
        for done, (name, folder, count) in enumerate(series, start=1):
            sent = storescu(node.port, [folder])
            if stored_count(sent) != count:
                raise RuntimeError(sent.stderr[-500:])

            def all_done(n: int = done) -> bool:
                return bool(node.status()["counts"]["jobs"]["DONE"] == n)

            wait_until(all_done, quiet + 600, "job done", interval=0.1)
            times = newest_job_times(store)
            row = store.get_series(times.job.series_uid)
            if row is None:
                raise RuntimeError("series row vanished")
            out.append(Latency(name, rule, times.last_ack - row.last_received, times.complete - row.last_received,
                               times.stages))
    finally:
        node.stop()
        pacs.stop()
        store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="p01,ct300", help="comma-separated: p01, ct300")
    parser.add_argument("--quiet-seconds", type=float, default=30.0, help="the quiet period of both nodes")
    args = parser.parse_args()
    names = [n.strip() for n in args.series.split(",") if n.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        series = []
        for name in names:
            if name == "p01":
                series.append(("P01 64 slices", P01, 64))
            elif name == "ct300":
                series.append(("CT 300 slices", work / "ct300", len(resliced_ct(work / "ct300", 300))))
            else:
                parser.error(f"unknown series {name!r}")
        evidence = run(work / "evidence", "evidence", args.quiet_seconds, series)
        quiet = run(work / "off", "off", args.quiet_seconds, series)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nlast instance acknowledged -> last result acknowledged by Orthanc (classical lung, CPU; quiet period "
          f"{args.quiet_seconds:g} s)")
    for fast, slow in zip(evidence, quiet, strict=True):
        print(f"  {fast.series:14s} evidence {fast.seconds:6.2f} s (complete after {fast.complete_after:5.2f} s)"
              f"   quiet period {slow.seconds:6.2f} s   ratio {slow.seconds / fast.seconds:5.1f}x")
        print(f"  {'':14s} stages: {fast.stages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
