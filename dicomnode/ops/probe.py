"""``dicomnode health``: is the node configured by this file up? For container health checks and scripts.

What it asks follows the configuration, never a fixed port:

1. ``metrics.enabled``: ``GET /health`` on the metrics server (the supervisor's view: every receiver and
   worker process alive);
2. else ``ui.enabled``: ``GET /health`` on the status page (the same document; with ``ui.token`` sent as a
   bearer token);
3. else a C-ECHO to the node's own DICOM port (receivers only: workers are not seen).

A wildcard listening address (``0.0.0.0``, ``::``) is asked on loopback. The document (schema
``dicomnode.health/1``): ``{"schema", "healthy": bool, "checked": "http://.../health" | "c-echo AE@host:port",
"detail": the /health document | {"status": C-ECHO status} | {"error": message}}``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from dicomnode.config import Config, Destination
from dicomnode.errors import DicomNodeError

HEALTH_SCHEMA = "dicomnode.health/1"


def _loopback(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _url(host: str, port: int) -> str:
    host = _loopback(host)
    return f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health"


def _http(url: str, token: str | None, timeout: float) -> tuple[bool, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as rsp:
            return True, dict(json.loads(rsp.read()))
    except urllib.error.HTTPError as exc:  # 503: the document says which process is down
        try:
            return False, dict(json.loads(exc.read()))
        except ValueError:
            return False, {"error": f"HTTP {exc.code}"}
    except (OSError, ValueError) as exc:
        return False, {"error": str(getattr(exc, "reason", exc))}


def check(cfg: Config, *, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the running node how it is (see the module docstring); never raises for an unreachable node."""
    if cfg.metrics.enabled or cfg.ui.enabled:
        host, port, token = ((cfg.metrics.host, cfg.metrics.port, None) if cfg.metrics.enabled
                             else (cfg.ui.host, cfg.ui.port, cfg.ui.token))
        url = _url(host, port)
        ok, doc = _http(url, token, timeout)
        return {"schema": HEALTH_SCHEMA, "healthy": ok and bool(doc.get("healthy")), "checked": url, "detail": doc}
    from dicomnode.ops.service import scu_settings  # noqa: PLC0415 - pynetdicom only for this fallback
    from dicomnode.outputs.scu import echo  # noqa: PLC0415

    node = Destination(name="self", ae_title=cfg.node.ae_title, host=_loopback(cfg.node.host), port=cfg.node.port,
                       tls=cfg.node.tls.enabled)
    checked = f"c-echo {node.ae_title}@{node.host}:{node.port}"
    try:
        status = echo(node, scu_settings(cfg))
    except DicomNodeError as exc:
        return {"schema": HEALTH_SCHEMA, "healthy": False, "checked": checked, "detail": {"error": str(exc)}}
    return {"schema": HEALTH_SCHEMA, "healthy": status == 0, "checked": checked, "detail": {"status": status}}
