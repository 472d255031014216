"""Command line: thin verbs over the config, the store and the service; the logic lives in ``admin.py``.

Every verb takes ``--config FILE`` (default: the embedded defaults) and ``--json`` (one JSON document on
stdout; schemas in :mod:`dicomnode.ops.admin`). Human output is a table on stdout; progress goes to stderr.
Never imports torch (``process`` and ``convert`` import their pipelines lazily).

Without ``--config`` (or ``$DICOMNODE_CONFIG``, the path of a file) every verb uses the embedded default
(:func:`dicomnode.config.default_raw`; print it with ``dicomnode config --print-defaults``); ``--set KEY=VALUE``
overrides single keys of either (``--set node.port=11113``). Data live under ``storage.path``: by default
``$DICOMNODE_HOME``, else ``~/.local/share/dicomnode``, whichever folder a verb is run from.

Exit codes: 0 success (also when the reader of stdout stops early, as ``status | head`` does); 1 the operation
failed (unknown job or series, the operation does not apply, peer or node unreachable, a missing input, a
send with failures); 2 usage or configuration error (with ``--json`` an error document
``{"error": MESSAGE, "exit_code": N}`` is printed on stdout too); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.config import Config, Destination, check_ae_title, load_config
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.ops import admin, retention, tables
from dicomnode.ops.logs import configure_logging
from dicomnode.ops.runtime import configure_libraries
from dicomnode.state.store import JobState

STATUS_SCHEMA = admin.STATUS_SCHEMA


CONFIG_ENV = "DICOMNODE_CONFIG"


def _config_path(args: argparse.Namespace) -> Path | None:
    """``--config FILE``, else ``$DICOMNODE_CONFIG`` when set, else None (the embedded default)."""
    name = getattr(args, "config", None) or os.environ.get(CONFIG_ENV, "").strip()
    return Path(name) if name else None


def _config(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args), getattr(args, "set", None) or ())


def _existing(paths: Sequence[str], what: str) -> list[Path]:
    """``paths`` as Paths; DicomNodeError naming the first that does not exist."""
    for name in paths:
        if not Path(name).exists():
            raise DicomNodeError(f"{what} {name} does not exist")
    return [Path(name) for name in paths]


def _emit(args: argparse.Namespace, doc: Any) -> bool:
    """Print ``doc`` as JSON when ``--json`` was given; True if printed (the caller then skips the table)."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
        return True
    return False


def status_document(cfg: Config, *, now: float | None = None) -> dict[str, Any]:
    """The ``status --json`` document (schema ``dicomnode.status/1``, see :mod:`dicomnode.ops.admin`)."""
    return admin.status_document(cfg, now=now)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    while True:
        doc = admin.status_document(cfg)
        if args.json:
            print(json.dumps(doc, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            tables.print_status(doc)
            if args.watch:
                print(f"\n(every {args.watch:g} s, Ctrl+C to stop)", flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    doc = admin.jobs_document(cfg, state=JobState(args.state) if args.state else None, since=args.since)
    if not _emit(args, doc):
        tables.print_jobs(doc["jobs"]) if doc["jobs"] else print("no jobs")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    doc = admin.show_document(_config(args), args.key)
    if not _emit(args, doc):
        tables.print_show(doc)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    if args.failed == (args.job is not None):
        raise ConfigError("give either a job id or --failed")
    retried = admin.retry(_config(args), args.job)
    if not _emit(args, {"schema": admin.RETRY_SCHEMA, "retried": retried}):
        ids = ", ".join(str(j["id"]) for j in retried)
        print(f"retried {len(retried)} job(s)" + (f": {ids}" if ids else ""))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = admin.cancel(_config(args), args.job)
    if not _emit(args, {"schema": admin.CANCEL_SCHEMA, "cancelled": job}):
        print(f"job {job['id']} cancelled")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    doc = admin.complete(_config(args), args.series)
    if not _emit(args, doc):
        s = doc["series"]
        print(f"series {s['series_uid']} is {s['state']}: {s['reason']}")
        if doc["jobs"]:
            tables.print_jobs(doc["jobs"])
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    doc = retention.purge(_config(args), args.older_than, force=args.force)
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


def cmd_send(args: argparse.Namespace) -> int:
    cfg = _config(args)
    paths = _existing(args.paths, "path")
    dest = _destination_from_args(cfg, args)
    doc = admin.send(cfg, paths, dest, on_progress=tables.progress_bar)
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
    if not _emit(args, {"schema": admin.ECHO_SCHEMA, "ae_title": dest.ae_title, "host": dest.host,
                        "port": dest.port, "status": status, "ok": ok, "milliseconds": round(ms, 1)}):
        print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: status 0x{status:04X} "
              f"({'success' if ok else 'failure'}) in {ms:.0f} ms")
    return 0 if ok else 1


def _pipeline_name(cfg: Config, wanted: str | None) -> str:
    """The pipeline ``process`` runs: ``wanted``, or the only one configured; else a message naming them."""
    names = [p.name for p in cfg.pipelines]
    if not names:
        raise ConfigError("the configuration has no pipelines (dicomnode config --print-defaults shows the default)")
    if wanted is None and len(names) == 1:
        return names[0]
    if wanted is None or wanted not in names:
        head = "give --pipeline NAME" if wanted is None else f"unknown pipeline {wanted!r}"
        raise ConfigError(f"{head}; pipelines available: {', '.join(names)}")
    return wanted


def cmd_process(args: argparse.Namespace) -> int:
    cfg = _config(args)
    (series_dir,) = _existing([args.series_dir], "series folder")
    pipeline = _pipeline_name(cfg, args.pipeline)
    from dicomnode.work.offline import process_series  # lazily: the image pipeline may import torch

    def progress(stage: str, fraction: float) -> None:
        print(f"[{100 * fraction:5.1f}%] {stage}", file=sys.stderr, flush=True)

    try:
        written = process_series(series_dir, pipeline, Path(args.out), cfg, progress)
    except OSError as exc:
        raise DicomNodeError(f"cannot write to {args.out}: {exc.strerror or exc}") from None
    if not _emit(args, {"schema": admin.PROCESS_SCHEMA, "pipeline": pipeline,
                        "outputs": [str(p) for p in written]}):
        for path in written:
            print(path)
    return 0


def _nifti_target(name: str) -> Path:
    """The output path of ``convert``: a .nii or .nii.gz file in an existing, writable folder."""
    out = Path(name)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")) or out.name.startswith(".nii"):
        raise ConfigError(f"{name}: the output must be a NIfTI file name ending in .nii.gz or .nii")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise DicomNodeError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise DicomNodeError(f"cannot write {out}: permission denied")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    (series_dir,) = _existing([args.series_dir], "series folder")
    if not series_dir.is_dir():
        raise DicomNodeError(f"{series_dir} is not a folder")
    out = _nifti_target(args.out)
    from dicomnode.imaging.nifti import convert_series

    try:
        written = convert_series(series_dir, out, mask=args.mask)
    except OSError as exc:
        raise DicomNodeError(f"cannot write {out}: {exc.strerror or exc}") from None
    if not _emit(args, {"schema": admin.CONVERT_SCHEMA, "outputs": [str(p) for p in written]}):
        for path in written:
            print(path)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from dicomnode.ops.configdoc import config_yaml, to_raw

    # --print-defaults: the embedded default (with --set applied and the storage path it resolves to here)
    cfg = load_config(None, args.set or ()) if args.print_defaults else _config(args)
    if not _emit(args, {"schema": admin.CONFIG_SCHEMA, "config": to_raw(cfg)}):
        print(config_yaml(cfg), end="")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from dicomnode.ops.probe import check

    doc = check(_config(args), timeout=args.timeout)
    if not _emit(args, doc):
        state = "healthy" if doc["healthy"] else "NOT healthy"
        detail = doc["detail"].get("error") or ", ".join(
            f"{p['name']} {'up' if p.get('alive') else 'DOWN'}"
            for role in ("receivers", "workers") for p in doc["detail"].get(role, []))
        print(f"{state} ({doc['checked']})" + (f": {detail}" if detail else ""))
    return 0 if doc["healthy"] else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.inference.inventory import preflight_config  # lazily: the frameworks import torch
    from dicomnode.ops.service import serve

    cfg = _config(args)
    configure_logging(cfg.logging.level, json_lines=cfg.logging.json or args.json)
    if _config_path(args) is None:
        logging.getLogger(__name__).info(
            "no --config: running the embedded default (dicomnode config --print-defaults shows it); data in %s",
            cfg.storage.path)
    preflight_config(cfg)  # a model that cannot load (e.g. missing weights) stops the node here, with the reason
    return serve(cfg)


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: each segment pipeline's model and whether its files are there; ``models check``: load each
    model as a worker would, with name, version, labels and device (exit code 1 when one does not load)."""
    from dicomnode.inference import inventory  # lazily: loading models imports torch and the frameworks

    cfg = _config(args)
    if args.action == "check":
        rows = inventory.check(cfg)
        ok = all(r["loads"] for r in rows)
        if not _emit(args, {"models": rows, "ok": ok}):
            for r in rows:
                print(f"{r['pipeline']}: {r['kind']} {r['source']}")
                if r["loads"]:
                    labels = ", ".join(f"{k} {v}" for k, v in r["labels"].items())
                    print(f"  {r['model']} {r['version']} on {r['device']}: loads; labels: {labels}")
                else:
                    print(f"  does not load: {r['error']}")
        return 0 if ok else 1
    rows = inventory.listing(cfg)
    if not _emit(args, {"models": rows}):
        tables.table(("PIPELINE", "KIND", "SOURCE", "READY"),
               [(r["pipeline"], r["kind"], r["source"], "yes" if r["ready"] else f"no: {r['problem']}")
                for r in rows])
    return 0 if all(r["ready"] for r in rows) else 1


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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description="DICOM processing node")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def verb(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", help="YAML configuration file (default: $DICOMNODE_CONFIG, else the "
                                                "embedded default: see dicomnode config --print-defaults)")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one configuration key, e.g. --set node.port=11113 (repeatable)")
        p.set_defaults(func=func)
        return p

    _queue_verbs(verb)
    _tool_verbs(verb)
    return parser


_Verb = Callable[[str, Any, str], argparse.ArgumentParser]


def _queue_verbs(verb: _Verb) -> None:
    """The node and its queue: serve, status, jobs, show, retry, cancel, complete, purge."""
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


def _tool_verbs(verb: _Verb) -> None:
    """Tools around the node: send, echo, process, models, convert, health, config."""
    p = verb("send", cmd_send, "C-STORE files or folders to a destination or any AE")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--to", dest="destination", metavar="DEST", help="destination name from the config")
    p.add_argument("--host")
    p.add_argument("--port", type=_port)
    p.add_argument("--aet", help="called AE title")
    p.add_argument("--tls", action="store_true", help="use the node's TLS settings")
    p = verb("echo", cmd_echo, "C-ECHO a destination (by name, or --host/--port/--aet)")
    p.add_argument("destination", nargs="?", help="destination name from the config")
    p.add_argument("--host")
    p.add_argument("--port", type=_port)
    p.add_argument("--aet", help="called AE title")
    p.add_argument("--tls", action="store_true", help="use the node's TLS settings")
    p = verb("process", cmd_process, "run a pipeline on a series folder, without a node or a PACS")
    p.add_argument("series_dir", metavar="SERIES_DIR")
    p.add_argument("--pipeline", help="pipeline name from the config (default: the only one there is)")
    p.add_argument("--out", required=True, help="output folder")
    p = verb("models", cmd_models, "each segment pipeline's model; 'check' loads them (version, labels, device)")
    p.add_argument("action", nargs="?", choices=["check"], help="load every model as a worker would")
    p = verb("convert", cmd_convert, "write a series folder as NIfTI (optionally with a mask)")
    p.add_argument("series_dir")
    p.add_argument("out", help="output .nii.gz path")
    p.add_argument("--mask", choices=["lung", "body", "brain"])
    p = verb("health", cmd_health, "is the node up? asks its /health (metrics or status page) or C-ECHOes it")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default 5)")
    p = verb("config", cmd_config, "print the effective configuration as YAML, ready to edit")
    p.add_argument("--print-defaults", action="store_true", help="the embedded default instead")


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
    except BrokenPipeError:
        # The reader went away (status | head): not a failure. Point stdout at /dev/null so the interpreter's
        # final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
