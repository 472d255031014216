"""Logging set-up, done only by entry points (the CLI and child processes); modules just getLogger(__name__).

Structured context: pass ``extra={"job_id": 7, "series_uid": "1.2..."}`` or wrap a logger with
:func:`context_logger`. The context keys in :data:`CONTEXT_KEYS` become fields of the JSON lines (and a
``[job=7 series=1.2...]`` suffix of text lines); any other ``extra`` key is ignored by the formatters, so a
patient attribute slipped into ``extra`` is never written. INFO lines carry UIDs and AE titles, never patient
names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

CONTEXT_KEYS = ("job_id", "series_uid", "study_uid", "pipeline", "destination", "calling_aet", "stage")


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_KEYS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, message, the context keys, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                               "logger": record.name, "process": record.processName,
                               "message": record.getMessage()}
        doc.update(_context(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = _context(record)
        if not ctx:
            return text
        short = {"job_id": "job", "series_uid": "series"}
        return text + " [" + " ".join(f"{short.get(k, k)}={v}" for k, v in ctx.items()) + "]"


class ContextAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds fixed context (job, series, ...) to every record; per-call ``extra`` wins."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def context_logger(logger: logging.Logger, **context: Any) -> ContextAdapter:
    """``context_logger(log, job_id=job.id, series_uid=job.series_uid).info("sent")``; keys: CONTEXT_KEYS."""
    unknown = set(context) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"not a log context key: {', '.join(sorted(unknown))}")
    return ContextAdapter(logger, context)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send log records to stderr, as text lines or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its chatter at WARNING unless we debug.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
