"""The status page application (Starlette, Jinja2 templates, no JavaScript): read-only views of the store.

Routes (all GET):

- ``/``: node and health (receivers, workers), series and jobs by state, queue, backlog per destination,
  the newest series (state, age, reason) and jobs.
- ``/series/{uid}``: a series with its jobs and its event history.
- ``/jobs/{id}``: a job: its event history, outputs by kind (the SEG's segments with the SR's volumes and
  mean HU, thumbnails of the Secondary Captures) and deliveries per destination.
- ``/jobs/{id}/outputs/{sop_uid}.png``: an output picture as PNG (``?size=N``, 64-2048 pixels); only
  objects of that job, only files inside the outbox.
- ``/health``: the supervisor's health document as JSON (200 when healthy, else 503), as the metrics server's
  ``/health`` answers it; what ``dicomnode health`` asks when metrics are off.
- ``/static/...``: the stylesheet.

Access: when ``ui.token`` is set every request needs it (``Authorization: Bearer``, basic auth password, the
``dicomnode_token`` cookie, or ``?token=`` which sets that cookie); without it: 401. Patient names and IDs
appear only with ``ui.show_patient_ids``. Pages reload themselves every ``ui.refresh_seconds``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicomnode import __version__
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError
from dicomnode.ops import admin
from dicomnode.ops.tables import age
from dicomnode.ops.web import pictures
from dicomnode.ops.web.views import job_view, overview, series_view
from dicomnode.state.store import Store

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COOKIE = "dicomnode_token"
HealthFn = Callable[[], dict[str, Any]]


def clock(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class TokenCheck(BaseHTTPMiddleware):
    """401 unless the request carries the configured token (constant-time comparison)."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token.encode()

    def _presented(self, request: Request) -> tuple[str | None, bool]:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip(), False
        if scheme.lower() == "basic":
            try:
                return base64.b64decode(value.strip()).decode().partition(":")[2], False
            except (binascii.Error, UnicodeDecodeError):
                return None, False
        if "token" in request.query_params:
            return request.query_params["token"], True
        return request.cookies.get(COOKIE), False

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        presented, from_query = self._presented(request)
        if presented is None or not secrets.compare_digest(presented.encode(), self.token):
            return PlainTextResponse("401: this status page needs its token (ui.token in the node's configuration)\n",
                                     status_code=401, headers={"WWW-Authenticate": 'Basic realm="dicomnode"'})
        response = await call_next(request)
        if from_query:
            response.set_cookie(COOKIE, presented, httponly=True, samesite="strict")
        return response


class Headers(BaseHTTPMiddleware):
    """No framing, no sniffing, no scripts, nothing from elsewhere, no caching of pages with patient data."""

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = ("default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                           "frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
        return response


def make_app(cfg: Config, health: HealthFn | None = None) -> Starlette:
    """The status page for the node configured by ``cfg``; ``health()`` gives the supervisor's ``/health``
    document (receivers and workers alive, restarts), None when no supervisor runs."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["age"] = age
    templates.env.filters["clock"] = clock
    started = time.time()

    def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        base = {"cfg": cfg, "version": __version__, "now": time.time(), "uptime": time.time() - started,
                "refresh": cfg.ui.refresh_seconds, "show_ids": cfg.ui.show_patient_ids}
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def with_store(build: Callable[[Store, Request], tuple[str, dict[str, Any]]]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            store = Store(cfg.db_path)
            try:
                name, context = build(store, request)
            except admin.NotFound as exc:
                return render(request, "missing.html", {"message": str(exc)}, status=404)
            finally:
                store.close()
            return render(request, name, context)

        return endpoint

    def index(store: Store, request: Request) -> tuple[str, dict[str, Any]]:
        return "index.html", overview(cfg, store, health() if health else None)

    def series(store: Store, request: Request) -> tuple[str, dict[str, Any]]:
        return "series.html", series_view(cfg, store, request.path_params["uid"])

    def job(store: Store, request: Request) -> tuple[str, dict[str, Any]]:
        return "job.html", job_view(cfg, store, int(request.path_params["job_id"]))

    def picture(request: Request) -> Response:
        return _picture(cfg, request)

    def healthz(request: Request) -> Response:
        doc = health() if health else {"healthy": False, "error": "not run by a supervisor"}
        return JSONResponse(doc, status_code=200 if doc.get("healthy") else 503)

    routes = [
        Route("/", with_store(index)),
        Route("/series/{uid:str}", with_store(series)),
        Route("/jobs/{job_id:int}", with_store(job)),
        Route("/jobs/{job_id:int}/outputs/{sop_uid:str}.png", picture),
        Route("/health", healthz),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(Headers)]
    if cfg.ui.token is not None:
        middleware.append(Middleware(TokenCheck, token=cfg.ui.token))
    return Starlette(routes=routes, middleware=middleware)


def _picture(cfg: Config, request: Request) -> Response:
    """One of the job's output objects as PNG; 404 for anything that is not its own file in the outbox."""
    job_id, sop_uid = int(request.path_params["job_id"]), request.path_params["sop_uid"]
    try:
        size = min(max(int(request.query_params.get("size", "320")), 64), 2048)
    except ValueError:
        return PlainTextResponse("size must be a number of pixels\n", status_code=400)
    store = Store(cfg.db_path)
    try:
        rows = [d for d in store.deliveries(job_id) if d.sop_uid == sop_uid]
    finally:
        store.close()
    outbox = cfg.outbox_dir.resolve()
    if not rows or not Path(rows[0].path).resolve().is_relative_to(outbox):
        return PlainTextResponse("no such output picture\n", status_code=404)
    try:
        png = pictures.thumbnail_png(Path(rows[0].path), size)
    except (OSError, ValueError, AttributeError, DicomNodeError) as exc:
        log.warning("status page: cannot render output %s of job %d: %s", sop_uid, job_id, type(exc).__name__)
        return PlainTextResponse("this object has no picture that can be shown\n", status_code=404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
