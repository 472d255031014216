"""Serving the status page: a socket bound when ``serve`` starts (a port in use fails start-up, like the DICOM
port), then uvicorn in a daemon thread of the supervisor until :meth:`StatusPage.stop`."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from dicomnode.config import Config
from dicomnode.errors import DicomNodeError

HealthFn = Callable[[], dict[str, Any]]

log = logging.getLogger(__name__)


class StatusPage:
    """``StatusPage(cfg)`` binds ``ui.host:ui.port``; ``start(health)`` serves; ``stop()`` ends it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        host, port = cfg.ui.host, cfg.ui.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.socket = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            raise DicomNodeError(f"status page: cannot listen on {host}:{port} (ui.port): "
                                 f"{exc.strerror or exc}") from exc
        self.port = int(self.socket.getsockname()[1])
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.cfg.ui.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.port}/"

    def start(self, health: HealthFn | None) -> None:
        import uvicorn  # noqa: PLC0415 - only the supervisor serves the page

        from dicomnode.ops.web.app import make_app  # noqa: PLC0415

        config = uvicorn.Config(make_app(self.cfg, health), log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.socket]},
                                        name="status-page", daemon=True)
        self._thread.start()
        log.info("status page on %s%s", self.url, " (token required)" if self.cfg.ui.token else "")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket.close()
