"""Logging set-up, done only by entry points (the CLI and child processes); modules just getLogger(__name__).

Structured context: pass ``extra={"job_id": 7, "series_uid": "1.2..."}`` or wrap a logger with
:func:`context_logger`. The context keys in :data:`CONTEXT_KEYS` become fields of the JSON lines (and a
``[job=7 series=1.2...]`` suffix of text lines); any other ``extra`` key is ignored by the formatters, so a
patient attribute slipped into ``extra`` is never written. INFO lines carry UIDs and AE titles, never patient
names, IDs or birth dates.

Libraries: Python warnings go through logging (logger ``py.warnings``) so that :class:`LibraryFilter` sees
them: highdicom's person-name warning (which quotes the patient's name) is logged without the name, at DEBUG;
highdicom's INFO chatter (dozens of lines per job) is DEBUG too; pynetdicom logs at WARNING unless debugging.
"""

from __future__ import annotations

import json
import logging
import re
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


# highdicom.valuerep.check_person_name: 'The string "<the name>" is unlikely to represent the intended person name'
_PERSON_NAME_WARNING = re.compile(r'The string ".*?" is unlikely to represent the intended person name', re.DOTALL)
_WITHHELD = "a person name without a caret (the value is withheld) is unlikely to represent the intended person name"
_CHATTY_LIBRARIES = ("highdicom",)


class LibraryFilter(logging.Filter):
    """A handler filter for what libraries log: removes the patient's name from highdicom's person-name
    warning and demotes it, like highdicom's INFO records, to DEBUG (dropped unless ``debug``)."""

    def __init__(self, *, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        demote = False
        if record.name == "py.warnings":
            text = record.getMessage()
            if _PERSON_NAME_WARNING.search(text):
                first = _PERSON_NAME_WARNING.sub(_WITHHELD, text).splitlines()[0]  # drop the quoted source line
                record.msg, record.args = first, None
                demote = True
        elif record.levelno == logging.INFO and record.name.split(".")[0] in _CHATTY_LIBRARIES:
            demote = True
        if demote:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.debug
        return True


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send log records (and Python warnings) to stderr, as text lines or one JSON object per line."""
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LibraryFilter(debug=level == "DEBUG"))
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its chatter at WARNING unless we debug.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
