"""The node API: one ASGI app (starlette) every long-running process serves.

What it serves comes from a ``Source``: the volume the process serves now (a
mount's live volume, a replica server's, an HA node's as its role changes), the
process's events and, on an HA node, the node's own state. Routes:

- ``GET /health``, ``/primary``, ``/replica?lag=N``: for load balancers (see
  ``health``), no token needed;
- ``GET /metrics``: Prometheus text (``metrics``);
- ``GET /api/v1/status``: the store's status document (``documents``), as
  ``cdpfs status --json`` prints it; ``GET /api/v1/node``: the process: what it
  serves, its role and, on an HA node, epoch, lease and lag;
- ``GET /api/v1/stat``, ``/api/v1/changes?a=M&b=M&path=P``: ``cdpfs stat`` and
  ``cdpfs diff``'s documents; ``/api/v1/tree``, ``/versions``, ``/diff``,
  ``/timeline``: what the console shows of history (``browse``);
- ``GET /api/v1/events?after=ID[&follow=0]``: newline-delimited JSON events
  (``cdpfs.events``), the kept ones after ``ID`` and then each as it happens;
- ``POST /api/v1/bookmarks`` ``{"name": ..., "at": MOMENT}``: bookmark a point
  of a live volume (an admin token); ``POST /api/v1/restore``, ``/switchover``,
  ``/drtests``, ``/backups``: the actions the front end offers (``ACTIONS``);
- ``GET /api/v1/openapi.json``: the OpenAPI document of all this.

Who may do what: ``access``. A request's failure is its own: a JSON
``{"error": "..."}`` with a 4xx or 5xx status, never a traceback, and the node
goes on serving.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CdpfsError, Exists
from ..events import Events
from ..status import status_of
from ..volume import Mode, Volume
from . import browse, documents, metrics
from .access import ANONYMOUS, Access, Caller, same_origin

log = logging.getLogger(__name__)

class Refused(CdpfsError):
    """An action that cannot be done now (another is under way, the role is wrong): 409."""


PLAIN = ("this API is served beyond loopback without TLS: the health endpoints only "
         "(give --api-cert and --api-key)")
CONSOLE_DIR = Path(__file__).parent / "console"  # the page, its script and style
MAX_BODY = 64 * 1024  # bytes an action's JSON may have
BODY_TIMEOUT = 10.0  # seconds an action's body may take to arrive


# An action a front end offers (``Source.actions``): called with the request's JSON
# object and the caller; its answer's JSON object. CdpfsError: refused, one line.
Action = Callable[[dict[str, Any], "Caller"], Awaitable[dict[str, Any]]]
ACTIONS = {  # route -> the action's name in Source.actions
    "/api/v1/restore": "restore",
    "/api/v1/switchover": "switchover",
    "/api/v1/drtests": "drtest",
    "/api/v1/backups": "backup",
}


class Source(Protocol):
    """What the API serves (a mount's, a replica server's or an HA node's)."""

    events: Events
    actions: dict[str, Action]  # what this process can do besides bookmarks

    @property
    def volume(self) -> Volume | None: ...

    def health(self) -> tuple[str, int | None, bool]:
        """Role, lag in records (None: not known), and whether it takes writes."""
        ...

    def about(self) -> dict[str, Any]:
        """What the process is (``GET /api/v1/node``)."""
        ...


@dataclass
class Served:
    """The ``Source`` of a process that serves one volume (``cdpfs mount``,
    ``cdpfs replica serve``)."""

    volume: Volume
    kind: str  # "mount" or "replica server"
    actions: dict[str, Action] = field(default_factory=dict)

    @property
    def events(self) -> Events:
        return self.volume.counters.events

    def health(self) -> tuple[str, int | None, bool]:
        volume = self.volume
        if volume.mode is Mode.SNAPSHOT or volume.mode is Mode.FOLLOW:
            return "reader", None, False
        if volume.mode is Mode.REPLICA:
            return "replica", None, False
        return "primary", 0, True

    def about(self) -> dict[str, Any]:
        volume = self.volume
        fanout = volume.fanout
        return {"kind": self.kind, "role": self.health()[0], "store": str(volume.path),
                "mode": volume.mode.value,
                "degraded": sorted(fanout.degraded) if fanout is not None else [],
                "events_run": self.events.run, "events_last_id": self.events.last_id}


def health_answer(path: str, query: dict[str, str], role: str, lag: int | None,
                  writable: bool) -> tuple[int, dict[str, Any]]:
    """The status code and body for a GET of a health endpoint: ``/primary`` 200 only
    on a primary that takes writes; ``/replica`` only on a replica, and with
    ``lag=N`` only on one known to be at most N records behind; ``/health`` on any
    running node. The body tells the role and lag, nothing else."""
    body = {"role": role, "lag": lag}
    if path == "/primary":
        return (200 if role == "primary" and writable else 503), body
    if path == "/replica":
        bound = query.get("lag")
        try:
            limit = int(bound) if bound is not None else None
        except ValueError:
            return 400, {"error": "lag: a number of records"}
        ok = role == "replica" and (limit is None or (lag is not None and lag <= limit))
        return (200 if ok else 503), body
    return 200, body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class NodeApp:
    """The routes over one ``Source`` (``app`` is the ASGI app)."""

    def __init__(self, source: Source, access: Access, *, scheme: str = "http") -> None:
        self.source = source
        self.access = access
        self.scheme = scheme
        self.space = metrics.Space()
        routes = [Route(p, self.health, methods=["GET", "HEAD"])
                  for p in ("/health", "/primary", "/replica")]
        routes += [
            Route("/metrics", self._reader(self.metrics), methods=["GET"]),
            Route("/api/v1/status", self._reader(self.status), methods=["GET"]),
            Route("/api/v1/node", self._reader(self.node), methods=["GET"]),
            Route("/api/v1/events", self._reader(self.events), methods=["GET"]),
            Route("/api/v1/tree", self._reader(self.tree), methods=["GET"]),
            Route("/api/v1/versions", self._reader(self.versions), methods=["GET"]),
            Route("/api/v1/diff", self._reader(self.diff), methods=["GET"]),
            Route("/api/v1/changes", self._reader(self.changes), methods=["GET"]),
            Route("/api/v1/stat", self._reader(self.stat), methods=["GET"]),
            Route("/api/v1/timeline", self._reader(self.timeline), methods=["GET"]),
            Route("/api/v1/openapi.json", self.openapi, methods=["GET"]),
            Route("/", self.console, methods=["GET"]),
            Route("/console/nodes", self.console_nodes, methods=["GET"]),
            Mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console"),
            Route("/api/v1/bookmarks", self._action(self.bookmark), methods=["POST"]),
        ]
        routes += [Route(path, self._action(self._offered(name)), methods=["POST"])
                   for path, name in ACTIONS.items()]
        self.app = Starlette(routes=routes, exception_handlers={
            404: lambda request, exc: _error(404, "not found"),
            405: lambda request, exc: _error(405, "method not allowed"),
            Exception: self._failed})

    async def _failed(self, request: Request, exc: Exception) -> Response:
        log.error("API %s %s: internal error: %s", request.method, request.url.path, exc,
                  exc_info=exc)
        return _error(500, f"internal error: {exc}")

    # --- who may ---------------------------------------------------------------------

    def _caller(self, request: Request) -> Caller | None:
        return self.access.caller(request.headers.get("authorization"))

    def _reader(self, handler: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def read(request: Request) -> Response:
            if self.access.health_only:
                return _error(403, PLAIN)
            if self._caller(request) is None:
                return _error(401, "a viewer or admin token is needed "
                              "(Authorization: Bearer TOKEN)")
            return await handler(request)
        return read

    def _action(self, handler: Callable[[Request, Caller, dict[str, Any]],
                                        Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def act(request: Request) -> Response:
            if self.access.health_only:
                return _error(403, PLAIN)
            caller = self._caller(request)
            if caller is None or caller is ANONYMOUS:
                return _error(401, "an admin token is needed (Authorization: Bearer TOKEN)")
            if not caller.may_act:
                return _error(403, f"{caller.name} may read, not act (a viewer token)")
            if not same_origin(request.headers.get("origin"), request.headers.get("host"),
                               self.scheme):
                log.warning("API: refused %s %s from origin %s", request.method,
                            request.url.path, request.headers.get("origin"))
                return _error(403, "a request from another site's page")
            if request.headers.get("content-type", "").split(";")[0] != "application/json":
                return _error(415, "send the action as application/json")
            body = await self._body(request)
            if isinstance(body, Response):
                return body
            log.info("API: %s asks %s %s", caller.name or "anonymous", request.url.path,
                     json.dumps(body)[:200])
            return await handler(request, caller, body)
        return act

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return _error(413, f"a request body of {MAX_BODY} bytes at most")
        data = b""
        with trio.move_on_after(BODY_TIMEOUT) as slow:
            async for chunk in request.stream():
                data += chunk
                if len(data) > MAX_BODY:
                    return _error(413, f"a request body of {MAX_BODY} bytes at most")
        if slow.cancelled_caught:
            return _error(408, f"the request body took more than {BODY_TIMEOUT:.0f}s")
        try:
            body = json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is a JSON object")
        return body

    # --- routes ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        code, body = health_answer(request.url.path, dict(request.query_params),
                                   *self.source.health())
        return JSONResponse(body, status_code=code)

    def _store(self) -> Any:
        volume = self.source.volume
        return None if volume is None else volume.store

    async def metrics(self, request: Request) -> Response:
        volume = self.source.volume
        counters = None if volume is None else volume.counters
        about = self.source.about()
        node = about if about["kind"] == "ha node" else None
        text = await trio.to_thread.run_sync(metrics.scrape, self._store(), counters,
                                             self.space, node)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def status(self, request: Request) -> Response:
        store = self._store()
        if store is None:
            return _error(503, "no store is served now")
        now = await trio.to_thread.run_sync(status_of, store)
        return JSONResponse(documents.status_document(now))

    async def node(self, request: Request) -> Response:
        return JSONResponse(self.source.about())

    async def events(self, request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return _error(400, "after: an event id")
        follow = request.query_params.get("follow", "1") not in ("0", "false", "no")
        events = self.source.events

        async def lines() -> AsyncIterator[bytes]:
            yield (json.dumps({"kind": "hello", "run": events.run,
                               "last_id": events.last_id}) + "\n").encode()
            if not follow:
                for event in events.since(after):
                    yield (json.dumps(event) + "\n").encode()
                return
            async for event in events.follow(after):
                yield (json.dumps(event) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _document(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Response:
        """``fn(store, *args)`` in a worker thread, as JSON; 400 with its one line
        for a bad path or moment, 503 while no store is served."""
        store = self._store()
        if store is None:
            return _error(503, "no store is served now")
        try:
            return JSONResponse(await trio.to_thread.run_sync(fn, store, *args))
        except CdpfsError as exc:
            return _error(400, str(exc))

    async def tree(self, request: Request) -> Response:
        q = request.query_params
        return await self._document(browse.listing, q.get("at", "now"), q.get("path", ""))

    async def versions(self, request: Request) -> Response:
        return await self._document(browse.file_versions,
                                    request.query_params.get("path", ""))

    async def diff(self, request: Request) -> Response:
        q = request.query_params
        return await self._document(browse.text_diff, q.get("path", ""), q.get("a", ""),
                                    q.get("b", "now"))

    async def changes(self, request: Request) -> Response:
        q = request.query_params
        return await self._document(browse.changes, q.get("a", ""), q.get("b", "now"),
                                    q.get("path", ""))

    async def stat(self, request: Request) -> Response:
        return await self._document(browse.space)

    async def timeline(self, request: Request) -> Response:
        try:
            seconds = float(request.query_params.get("seconds", "3600"))
            buckets = int(request.query_params.get("buckets", "60"))
        except ValueError:
            return _error(400, "seconds: a duration in seconds; buckets: a number")
        if not (1 <= seconds <= 366 * 86400 and 1 <= buckets <= 1000):
            return _error(400, "seconds: 1 to a year; buckets: 1 to 1000")
        return await self._document(browse.timeline, time.time_ns(), seconds, buckets)

    async def console(self, request: Request) -> Response:
        """The console's page (it asks for a token and keeps it in the tab)."""
        return FileResponse(CONSOLE_DIR / "index.html")

    async def console_nodes(self, request: Request) -> Response:
        """The nodes the console shows: this one (``cdpfs console`` lists many)."""
        about = self.source.about()
        return JSONResponse([{"name": about.get("name") or about["kind"], "base": ""}])

    async def openapi(self, request: Request) -> Response:
        from .openapi import document
        return JSONResponse(document())

    def _offered(self, name: str) -> Callable[[Request, Caller, dict[str, Any]],
                                              Awaitable[Response]]:
        async def run(request: Request, caller: Caller, body: dict[str, Any]) -> Response:
            action = self.source.actions.get(name)
            if action is None:
                return _error(409, f"this node does not offer a {name} "
                              f"(it is a {self.source.about()['kind']})")
            self.source.events.emit("action", what=name, caller=caller.name,
                                    request=body)
            try:
                answer = await action(body, caller)
            except CdpfsError as exc:
                log.warning("API: %s's %s refused: %s", caller.name, name, exc)
                return _error(409 if isinstance(exc, Refused) else 400, str(exc))
            log.info("API: %s's %s: %s", caller.name, name, json.dumps(answer)[:200])
            return JSONResponse(answer, status_code=202 if answer.get("started") else 200)
        return run

    async def bookmark(self, request: Request, caller: Caller,
                       body: dict[str, Any]) -> Response:
        name, at = body.get("name"), body.get("at")
        if not isinstance(name, str) or not (at is None or isinstance(at, str)):
            return _error(400, "name (a string) and at (a moment, optional)")
        volume = self.source.volume
        if volume is None or volume.mode is not Mode.LIVE:
            return _error(409, "bookmarks are made on the primary's live volume")
        try:
            mark, ts = await volume.bookmark(name, at)
        except Exists as exc:
            return _error(409, str(exc))
        except CdpfsError as exc:  # a bad name or moment
            return _error(400, str(exc))
        self.source.events.emit("action", what="bookmark", caller=caller.name, name=name,
                                seq=mark.seq)
        return JSONResponse({"name": mark.name, "seq": mark.seq, "time": documents.iso(ts)},
                            status_code=201)
