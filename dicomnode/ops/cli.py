"""Command line: thin verbs over the config, the store and the service; the logic lives in ``admin.py``.

Every verb takes ``--config FILE`` (default: the embedded defaults) and ``--json`` (one JSON document on
stdout; schemas in :mod:`dicomnode.ops.admin`). Human output is a table on stdout; progress goes to stderr.
Never imports torch (``process`` and ``convert`` import their pipelines lazily).

Exit codes: 0 success; 1 the operation failed (unknown job or series, the operation does not apply, peer or
node unreachable, a send with failures); 2 usage or configuration error (with ``--json`` an error document
``{"error": MESSAGE, "exit_code": N}`` is printed on stdout too); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.config import Config, Destination, check_ae_title, load_config
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.ops import admin
from dicomnode.ops.logs import configure_logging
from dicomnode.ops.runtime import configure_libraries
from dicomnode.outputs.scu import StoreResult
from dicomnode.state.store import JobState

STATUS_SCHEMA = admin.STATUS_SCHEMA


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if getattr(args, "config", None) else None)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _emit(args: argparse.Namespace, doc: Any) -> bool:
    """Print ``doc`` as JSON when ``--json`` was given; True if printed (the caller then skips the table)."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
        return True
    return False


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def status_document(cfg: Config, *, now: float | None = None) -> dict[str, Any]:
    """The ``status --json`` document (schema ``dicomnode.status/1``, see :mod:`dicomnode.ops.admin`)."""
    return admin.status_document(cfg, now=now)


def _print_status(doc: dict[str, Any]) -> None:
    counts = doc["counts"]
    print("series: " + ", ".join(f"{k} {v}" for k, v in counts["series"].items()))
    print("jobs:   " + ", ".join(f"{k} {v}" for k, v in counts["jobs"].items()))
    oldest = doc["queue"]["oldest_waiting"]
    if oldest:
        waited = _age(oldest["waiting_seconds"])
        print(f"oldest waiting job: {oldest['job_id']} ({oldest['pipeline']}) for {waited}")
    if doc["backlog"]:
        print("backlog (pending deliveries): " + ", ".join(f"{k} {v}" for k, v in doc["backlog"].items()))
    if doc["series"]:
        print()
        _table(["SERIES UID", "MOD", "INST", "STATE", "AGE", "REASON"],
               [[s["series_uid"], s["modality"], s["instances"], s["state"], _age(s["age_seconds"]),
                 s["reason"]] for s in doc["series"]])


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    while True:
        doc = admin.status_document(cfg)
        if args.json:
            print(json.dumps(doc, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            _print_status(doc)
            if args.watch:
                print(f"\n(every {args.watch:g} s, Ctrl+C to stop)", flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _print_jobs(rows: list[dict[str, Any]]) -> None:
    _table(["JOB", "STATE", "PIPELINE", "TRIES", "AGE", "DELIVERIES", "SERIES UID", "ERROR"],
           [[j["id"], j["state"], j["pipeline"], j["attempts"], _age(j["age_seconds"]),
             " ".join(f"{k}:{v}" for k, v in j["deliveries"].items()) or "-", j["series_uid"],
             j["error"][:60]] for j in rows])


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    doc = admin.jobs_document(cfg, state=JobState(args.state) if args.state else None, since=args.since)
    if not _emit(args, doc):
        _print_jobs(doc["jobs"]) if doc["jobs"] else print("no jobs")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    doc = admin.show_document(_config(args), args.key)
    if _emit(args, doc):
        return 0
    series = doc["series"]
    if series:
        print(f"series {series['series_uid']}: {series['modality']} {series['instances']} instance(s), "
              f"{series['state']} (generation {series['generation']}) {series['reason']}")
    job_docs = [doc["job"]] if doc["kind"] == "job" else doc["jobs"]
    for job in job_docs:
        print(f"\njob {job['id']}: {job['pipeline']} {job['state']}, {job['attempts']} attempt(s)"
              + (f": {job['error']}" if job["error"] else ""))
        ran = job.get("inference")
        if ran:
            where = f"Ray node {ran['node_ip']} {ran['node_id'][:12]}, actor {ran['actor_id'][:12]} (replica " \
                    f"{ran['replica']})" if ran["engine"] == "ray" else f"{ran['node_ip']} (local, pid {ran['pid']})"
            print(f"  inference on {where}: {ran['seconds']:.2f} s after {ran['wait_seconds']:.2f} s waiting")
        outputs = doc["outputs"] if doc["kind"] == "job" else job["outputs"]
        rows = [[o["sop_uid"], d["destination"], d["state"],
                 "-" if d["status"] is None else f"0x{d['status']:04X}", d["detail"]]
                for o in outputs for d in o["deliveries"]]
        if rows:
            _table(["  OUTPUT SOP UID", "DESTINATION", "STATE", "STATUS", "DETAIL"], rows)
    print("\nevents:")
    for e in doc["events"]:
        job = "" if e["job_id"] is None else e["job_id"]
        print(f"  {_when(e['ts'])}  {e['kind']:<18} {job:>4}  {e['message']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if args.failed == (args.job is not None):
        raise ConfigError("give either a job id or --failed")
    retried = admin.retry(_config(args), args.job)
    if not _emit(args, {"retried": retried}):
        ids = ", ".join(str(j["id"]) for j in retried)
        print(f"retried {len(retried)} job(s)" + (f": {ids}" if ids else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = admin.cancel(_config(args), args.job)
    if not _emit(args, {"cancelled": job}):
        print(f"job {job['id']} cancelled")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    doc = admin.complete(_config(args), args.series)
    if not _emit(args, doc):
        s = doc["series"]
        print(f"series {s['series_uid']} is {s['state']}: {s['reason']}")
        if doc["jobs"]:
            _print_jobs(doc["jobs"])
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    doc = admin.purge(_config(args), args.older_than, force=args.force)
    if _emit(args, doc):
        return 0
    for r in doc["removed"]:
        print(f"removed {r['series_uid']} ({r['state']}): {r['jobs']} job(s), {r['files']} file(s), "
              f"{r['bytes'] / 2**20:.1f} MiB")
    for r in doc["skipped"]:
        print(f"kept    {r['series_uid']}: {r['reason']} (use --force to remove)")
    print(f"purged {len(doc['removed'])} series, {doc['files']} file(s), {doc['bytes'] / 2**20:.1f} MiB")
    return 0


def _destination_from_args(cfg: Config, args: argparse.Namespace) -> Destination:
    if args.destination:
        return cfg.destination(args.destination)
    if not (args.host and args.port and args.aet):
        raise ConfigError("give a destination name from the config, or --host, --port and --aet")
    if args.tls and not cfg.node.tls.enabled:
        raise ConfigError("--tls needs node.tls (certificates) in the configuration")
    return Destination(name="adhoc", ae_title=check_ae_title(args.aet, "--aet"), host=args.host,
                       port=args.port, tls=bool(args.tls))


def _progress_bar(done: int, total: int, result: StoreResult) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {result.outcome.value:<9}",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def cmd_send(args: argparse.Namespace) -> int:
    cfg = _config(args)
    dest = _destination_from_args(cfg, args)
    doc = admin.send(cfg, [Path(p) for p in args.paths], dest, on_progress=_progress_bar)
    if not _emit(args, doc):
        statuses = ", ".join(f"{k} x{v}" for k, v in doc["statuses"].items())
        print(f"sent {doc['files']} file(s) to {dest.ae_title}@{dest.host}:{dest.port}: "
              f"{doc['stored']} stored, {doc['failed']} failed ({statuses})")
        for f in doc["failures"][:20]:
            print(f"  {f['path']}: {f['detail']}")
    return 0 if doc["failed"] == 0 else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomnode.ops.service import scu_settings
    from dicomnode.outputs.scu import echo

    cfg = _config(args)
    dest = _destination_from_args(cfg, args)
    started = time.monotonic()
    status = echo(dest, scu_settings(cfg))
    ok = status == 0
    ms = 1000 * (time.monotonic() - started)
    if not _emit(args, {"ae_title": dest.ae_title, "host": dest.host, "port": dest.port, "status": status,
                        "ok": ok, "milliseconds": round(ms, 1)}):
        print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: status 0x{status:04X} "
              f"({'success' if ok else 'failure'}) in {ms:.0f} ms")
    return 0 if ok else 1


def cmd_process(args: argparse.Namespace) -> int:
    from dicomnode.work.offline import process_series  # lazily: the image pipeline may import torch

    cfg = _config(args)

    def progress(stage: str, fraction: float) -> None:
        print(f"[{100 * fraction:5.1f}%] {stage}", file=sys.stderr, flush=True)

    written = process_series(Path(args.series_dir), args.pipeline, Path(args.out), cfg, progress)
    if not _emit(args, {"pipeline": args.pipeline, "outputs": [str(p) for p in written]}):
        for path in written:
            print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dicomnode.imaging.nifti import convert_series

    written = convert_series(Path(args.series_dir), Path(args.out), mask=args.mask)
    if not _emit(args, {"outputs": [str(p) for p in written]}):
        for path in written:
            print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.ops.service import serve

    cfg = _config(args)
    configure_logging(cfg.logging.level, json_lines=cfg.logging.json or args.json)
    return serve(cfg)


def _duration(text: str) -> float:
    try:
        return admin.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _since(text: str) -> float:
    try:
        return admin.parse_since(text, now=time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM processing node")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def verb(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", help="YAML configuration file (default: embedded defaults)")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.set_defaults(func=func)
        return p

    verb("serve", cmd_serve, "run receiver(s) and worker(s) until SIGTERM/SIGINT (--json: JSON log lines)")
    p = verb("status", cmd_status, "counts per state, queue, backlog per destination, a row per series")
    p.add_argument("--watch", type=float, metavar="N", help="repeat every N seconds until Ctrl+C")
    p = verb("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--state", choices=[s.value for s in JobState], type=str.upper)
    p.add_argument("--since", type=_since, metavar="T", help="updated since T: 10m, 2h, 3d or an ISO time")
    p = verb("show", cmd_show, "a job (by id) or a series (by UID): history, outputs, deliveries")
    p.add_argument("key", metavar="JOB|SERIES")
    p = verb("retry", cmd_retry, "make a FAILED/CANCELLED job due now (refused objects are re-sent)")
    p.add_argument("job", type=int, nargs="?")
    p.add_argument("--failed", action="store_true", help="retry every FAILED job")
    p = verb("cancel", cmd_cancel, "cancel a QUEUED or RUNNING job")
    p.add_argument("job", type=int)
    p = verb("complete", cmd_complete, "judge a RECEIVING series complete now and route it")
    p.add_argument("series", metavar="SERIES_UID")
    p = verb("purge", cmd_purge, "delete files and history of finished series older than a duration")
    p.add_argument("--older-than", type=_duration, required=True, metavar="DURATION", help="e.g. 30d, 12h")
    p.add_argument("--force", action="store_true", help="also remove undelivered or unfinished work")
    p = verb("send", cmd_send, "C-STORE files or folders to a destination or any AE")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--to", dest="destination", metavar="DEST", help="destination name from the config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--aet", help="called AE title")
    p.add_argument("--tls", action="store_true", help="use the node's TLS settings")
    p = verb("echo", cmd_echo, "C-ECHO a destination (by name, or --host/--port/--aet)")
    p.add_argument("destination", nargs="?", help="destination name from the config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--aet", help="called AE title")
    p.add_argument("--tls", action="store_true", help="use the node's TLS settings")
    p = verb("process", cmd_process, "run a pipeline on a series folder, without a node or a PACS")
    p.add_argument("series_dir", metavar="SERIES_DIR")
    p.add_argument("--pipeline", required=True, help="pipeline name from the config")
    p.add_argument("--out", required=True, help="output folder")
    p = verb("convert", cmd_convert, "write a series folder as NIfTI (optionally with a mask)")
    p.add_argument("series_dir")
    p.add_argument("out", help="output .nii.gz path")
    p.add_argument("--mask", choices=["lung", "body", "brain"])
    return parser


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"dicomnode: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_libraries()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        return _fail(args, f"configuration error: {exc}", 2)
    except DicomNodeError as exc:
        return _fail(args, str(exc), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
