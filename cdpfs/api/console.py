"""``cdpfs console --nodes URL,...``: the web console over many nodes.

It serves the same page every node serves at ``/``, and passes the page's
requests for node N (``/nodes/N/...``) on to that node's API with the page's
token, so one page shows every volume, replica and cluster node; the browser
talks to this server only (no cross-origin requests, nothing loaded from
elsewhere). An action through it must come from its own page (``access``'s
origin rule, checked here, since the node sees this server, not the browser).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CdpfsError
from .access import same_origin
from .app import CONSOLE_DIR, MAX_BODY

log = logging.getLogger(__name__)

PASSED_ON = ("authorization", "content-type", "accept")  # request headers a node gets
TIMEOUT = httpx.Timeout(30.0, read=None)  # events stream for as long as the page is open


def check_nodes(urls: list[str]) -> list[str]:
    """The node URLs, checked (CdpfsError for one that is not http(s)://HOST:PORT)."""
    out = []
    for url in urls:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in (
                "", "/"):
            raise CdpfsError(f"{url}: a node's API address, such as http://10.0.0.5:8470")
        out.append(f"{parts.scheme}://{parts.netloc}")
    if not out:
        raise CdpfsError("--nodes: at least one node")
    return out


def console_app(urls: list[str], *, verify: ssl.SSLContext | bool = True,
                scheme: str = "http") -> Starlette:
    """The console's ASGI app over the nodes at ``urls``."""
    nodes = check_nodes(urls)
    client = httpx.AsyncClient(timeout=TIMEOUT, verify=verify)

    async def page(request: Request) -> Response:
        return FileResponse(CONSOLE_DIR / "index.html")

    async def listed(request: Request) -> Response:
        return JSONResponse([{"name": urlsplit(url).netloc, "base": f"/nodes/{i}"}
                             for i, url in enumerate(nodes)])

    async def relay(request: Request) -> Response:
        index = request.path_params["index"]
        if index >= len(nodes):
            return JSONResponse({"error": "no such node"}, status_code=404)
        if request.method == "POST" and not same_origin(
                request.headers.get("origin"), request.headers.get("host"), scheme):
            return JSONResponse({"error": "a request from another site's page"},
                                status_code=403)
        body = await request.body() if request.method == "POST" else None
        if body is not None and len(body) > MAX_BODY:
            return JSONResponse({"error": f"a request body of {MAX_BODY} bytes at most"},
                                status_code=413)
        url = f"{nodes[index]}/{request.path_params['path']}"
        headers = {k: v for k, v in request.headers.items() if k in PASSED_ON}
        try:
            sent = client.build_request(request.method, url, params=request.query_params,
                                        headers=headers, content=body)
            answer = await client.send(sent, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"node {urlsplit(url).netloc}: {exc or 'no answer'}"},
                                status_code=502)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                log.info("console: %s: %s", url, exc)
            finally:
                await answer.aclose()

        return StreamingResponse(chunks(), status_code=answer.status_code,
                                 media_type=answer.headers.get("content-type"))

    return Starlette(routes=[
        Route("/", page),
        Route("/console/nodes", listed),
        Mount("/console", StaticFiles(directory=CONSOLE_DIR)),
        Route("/nodes/{index:int}/{path:path}", relay, methods=["GET", "POST"]),
    ])
