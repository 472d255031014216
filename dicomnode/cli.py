"""Command line: thin verbs over the config, the store and the service. Never imports torch at module level.

Exit codes: 0 success, 1 the operation failed (peer unreachable, job not retryable, ...), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dicomnode import __version__
from dicomnode.config import Config, Destination, check_ae_title, load_config
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.logs import configure_logging

STATUS_SCHEMA = "dicomnode.status/1"


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if getattr(args, "config", None) else None)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status_document(cfg: Config, *, now: float | None = None) -> dict[str, object]:
    """The ``status --json`` document (schema ``dicomnode.status/1``, documented in README.md)."""
    from dicomnode.store import JobState, Store

    now = time.time() if now is None else now
    store = Store(cfg.db_path)
    queued = store.list_jobs(state=JobState.QUEUED)
    return {
        "schema": STATUS_SCHEMA,
        "node": {"ae_title": cfg.node.ae_title, "host": cfg.node.host, "port": cfg.node.port},
        "generated_at": now,
        "counts": store.counts(),
        "oldest_queued_job_age_seconds": max((now - j.created_at for j in queued), default=None),
        "series": [
            {"series_uid": s.series_uid, "study_uid": s.study_uid, "modality": s.modality,
             "description": s.description, "calling_aet": s.calling_aet, "instances": s.n_instances,
             "bytes": s.n_bytes, "state": s.state.value, "age_seconds": round(now - s.last_received, 3),
             "generation": s.generation, "reason": s.reason}
            for s in store.list_series()
        ],
    }


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    doc = status_document(cfg)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    counts = doc["counts"]
    assert isinstance(counts, dict)
    print("series: " + ", ".join(f"{k} {v}" for k, v in counts["series"].items()))
    print("jobs:   " + ", ".join(f"{k} {v}" for k, v in counts["jobs"].items()))
    rows = doc["series"]
    assert isinstance(rows, list)
    if rows:
        print(f"\n{'SERIES UID':<64} {'MOD':<4} {'INST':>5} {'STATE':<10} {'AGE':>6}  REASON")
        for s in rows:
            print(f"{s['series_uid']:<64} {s['modality']:<4} {s['instances']:>5} {s['state']:<10} "
                  f"{_age(s['age_seconds']):>6}  {s['reason']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.service import serve

    cfg = _config(args)
    configure_logging(cfg.logging.level, json_lines=cfg.logging.json)
    return serve(cfg)


def _destination_from_args(cfg: Config, args: argparse.Namespace) -> Destination:
    if args.destination:
        return cfg.destination(args.destination)
    if not (args.host and args.port and args.aet):
        raise ConfigError("give a destination name from the config, or --host, --port and --aet")
    return Destination(name="adhoc", ae_title=check_ae_title(args.aet, "--aet"), host=args.host, port=args.port,
                       tls=bool(args.tls))


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomnode.service import scu_settings
    from dicomnode.scu import echo

    cfg = _config(args)
    dest = _destination_from_args(cfg, args)
    started = time.monotonic()
    status = echo(dest, scu_settings(cfg))
    ok = status == 0
    print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: status 0x{status:04X} "
          f"({'success' if ok else 'failure'}) in {1000 * (time.monotonic() - started):.0f} ms")
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from dicomnode.nifti import convert_series

    written = convert_series(Path(args.series_dir), Path(args.out), mask=args.mask)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM processing node")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="YAML configuration file (default: embedded defaults)")
        return p

    p = with_config(sub.add_parser("serve", help="run receiver(s) and worker(s) until SIGTERM/SIGINT"))
    p.set_defaults(func=cmd_serve)
    p = with_config(sub.add_parser("status", help="counts per state and a row per series"))
    p.add_argument("--json", action="store_true", help="machine-readable output (schema dicomnode.status/1)")
    p.set_defaults(func=cmd_status)
    p = with_config(sub.add_parser("echo", help="C-ECHO a destination (by name, or --host/--port/--aet)"))
    p.add_argument("destination", nargs="?", help="destination name from the config")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--aet", help="called AE title")
    p.add_argument("--tls", action="store_true", help="use the node's TLS settings")
    p.set_defaults(func=cmd_echo)
    p = sub.add_parser("convert", help="write a series folder as NIfTI (optionally with a mask)")
    p.add_argument("series_dir")
    p.add_argument("out", help="output .nii.gz path")
    p.add_argument("--mask", choices=["lung", "body", "brain"])
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
