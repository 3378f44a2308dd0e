"""Serve the node API: hypercorn's trio worker in the process's own trio loop.

``serve_api`` is started with ``nursery.start`` beside the volume it reports on
and returns the address it listens on (port 0 picks a free one). It also keeps
the space figures of the metrics fresh (a scan now and then, in a thread).
Limits: hypercorn's 16 KiB of request head; the app's on bodies (``app``: 64 KiB,
10 s). A request whose head never ends holds its own connection only. The access
log is off: a scrape a second would drown the node's own log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..errors import CdpfsError
from ..replication.protocol import parse_address
from ..store.lmdb import Store
from .access import Access, check_listen, is_loopback, load_tokens
from .app import NodeApp, Source

log = logging.getLogger(__name__)

DEFAULT_PORT = 8470


@dataclass(frozen=True, slots=True)
class ApiOptions:
    """How a process serves its API (``--api``, ``--api-tokens``, ``--api-cert``,
    ``--api-key``)."""

    address: str
    tokens: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def access(self) -> Access:
        """Who may do what (CdpfsError for a bad tokens file); beyond loopback without
        TLS: the health endpoints only."""
        host, _ = parse_address(self.address, any_port=True)
        if (self.cert is None) != (self.key is None):
            raise CdpfsError("--api-cert and --api-key go together")
        tokens = load_tokens(self.tokens) if self.tokens is not None else {}
        plain = self.cert is None and not is_loopback(host)
        return Access(tokens, open_reads=is_loopback(host), health_only=plain)


def _config(options: ApiOptions) -> Config:
    config = Config()
    host, port = parse_address(options.address, any_port=True)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # No read timeout: hypercorn's applies to a whole connection, and would end an
    # events stream whose client has nothing more to say (it did, after 10 s).
    config.accesslog = None
    config.errorlog = logging.getLogger("cdpfs.api.hypercorn")
    config.include_server_header = False
    config.graceful_timeout = 1.0
    if options.cert is not None and options.key is not None:
        config.certfile, config.keyfile = str(options.cert), str(options.key)
    return config


async def serve_api(options: ApiOptions, source: Source, *,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API of ``source`` until cancelled; started: the bound address
    (``http://host:port`` or ``https://...``)."""
    access = options.access()
    node = NodeApp(source, access, scheme="https" if options.cert else "http")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve_app, options, node.app, whole=False))
        nursery.start_soon(node.space.refresh, lambda: _store(source))
        if access.health_only:
            log.warning("API on %s without TLS: the health endpoints only (give "
                        "--api-cert and --api-key for the rest)", bound)
        else:
            log.info("API on %s", bound)
        task_status.started(bound)


async def serve_app(options: ApiOptions, app: Any, *, whole: bool = True,
                    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the ASGI ``app`` as ``options`` say (``serve_api``, ``cdpfs console``);
    ``whole``: all of it is served to whoever reaches it, so beyond loopback only
    with TLS (CdpfsError)."""
    host, _ = parse_address(options.address, any_port=True)
    if whole:
        check_listen(host, options.cert is not None)
    async with trio.open_nursery() as nursery:
        try:
            binds = await nursery.start(serve, app, _config(options))
        except OSError as exc:
            raise CdpfsError(f"{options.address}: {exc.strerror or exc}") from None
        task_status.started(binds[0])


def _store(source: Source) -> Store | None:
    """The store ``source`` serves now (an HA node serves another after each role
    change; a replica server has none until its first primary made it)."""
    volume = source.volume
    return None if volume is None else volume.store
