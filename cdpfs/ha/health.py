"""The health endpoint of a node, in the convention load balancers use.

``GET /primary`` answers 200 only on the primary whose fence is open (it may
acknowledge writes), ``GET /replica`` only on a replica, and with ``?lag=N``
only on one at most N records behind the newest position any node reported;
anything else 503. ``GET /health`` is 200 on any running node. The body is
``{"role": ..., "lag": ...}`` and nothing else: no names, paths or addresses.
It changes nothing, so it needs no authentication (``promote`` and
``switchover`` act only through etcd). HAProxy: ``option httpchk GET /primary``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import trio

from ..replication.protocol import parse_address

log = logging.getLogger(__name__)

Status = Callable[[], tuple[str, int | None, bool]]  # role, lag, may write
MAX_REQUEST = 4096
READ_TIMEOUT = 2.0


def answer(path: str, role: str, lag: int | None, writable: bool) -> tuple[int, dict]:
    """The status code and body for a GET of ``path``."""
    parts = urlsplit(path)
    body = {"role": role, "lag": lag}
    if parts.path == "/primary":
        return (200 if role == "primary" and writable else 503), body
    if parts.path == "/replica":
        bound = parse_qs(parts.query).get("lag")
        try:
            limit = int(bound[0]) if bound else None
        except ValueError:
            return 400, {"error": "lag: a number of records"}
        ok = role == "replica" and lag is not None and (limit is None or lag <= limit)
        return (200 if ok else 503), body
    if parts.path == "/health":
        return 200, body
    return 404, {"error": "not found"}


async def _handle(stream: trio.abc.Stream, status: Status) -> None:
    data = b""
    with trio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
            chunk = await stream.receive_some(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(line) != 3 or line[0] not in ("GET", "HEAD"):
        code, body = 400, {"error": "GET /primary, /replica[?lag=N] or /health"}
    else:
        code, body = answer(line[1], *status())
    text = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}
    head = (f"HTTP/1.1 {code} {reason[code]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n").encode()
    try:
        await stream.send_all(head + (b"" if line[:1] == ["HEAD"] else text))
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_health(address: str, status: Status, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer health requests on ``address`` (host:port) until cancelled."""
    host, port = parse_address(address)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, status)
        except OSError as exc:
            log.info("health request: %s", exc)

    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("health endpoint on %s", address)
    task_status.started()
    await trio.serve_listeners(handler, listeners)
