"""The options every long-running command shares: where and how it serves the node API
(``cdpfs mount``, ``cdpfs replica serve``, ``cdpfs ha run``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # imported when used: the server's modules are many, most commands
    from cdpfs.api.server import ApiOptions  # serve nothing

F = Callable[..., Any]


def api_options(fn: F) -> F:
    """Add ``--api``, ``--api-tokens``, ``--api-cert`` and ``--api-key`` to a command
    (its function gets them as ``api``, ``api_tokens``, ``api_cert``, ``api_key``)."""
    for option in reversed([
        click.option("--api", metavar="HOST:PORT",
                     help="Serve the node API there: /health, /primary, /replica, "
                     "/metrics, /api/v1/... and the console at / (beyond loopback, "
                     "without --api-cert, the health endpoints only)."),
        click.option("--api-tokens", type=click.Path(path_type=Path, dir_okay=False),
                     help="The API's tokens, one 'ROLE NAME TOKEN' per line (ROLE viewer "
                     "or admin); readable by its owner only."),
        click.option("--api-cert", type=click.Path(path_type=Path, dir_okay=False),
                     help="The API's TLS certificate (PEM)."),
        click.option("--api-key", type=click.Path(path_type=Path, dir_okay=False),
                     help="The API's TLS key (PEM)."),
    ]):
        fn = option(fn)
    return fn


def api_from(api: str | None, api_tokens: Path | None, api_cert: Path | None,
             api_key: Path | None, *, elsewhere: bool = False) -> ApiOptions | None:
    """The options given (checked now, before the command starts serving: a bad
    address or tokens file fails here); None without ``--api``.
    ``elsewhere``: the address may come from elsewhere (an HA node's, as it joined):
    the other options without ``--api`` give options with no address."""
    from cdpfs.api.access import load_tokens
    from cdpfs.api.server import ApiOptions
    from cdpfs.replication.protocol import parse_address

    if api is None and not (elsewhere and (api_tokens or api_cert or api_key)):
        if api_tokens or api_cert or api_key:
            raise click.UsageError("--api-tokens, --api-cert and --api-key go with --api")
        return None
    options = ApiOptions(api or "", tokens=api_tokens and api_tokens.resolve(),
                         cert=api_cert and api_cert.resolve(),
                         key=api_key and api_key.resolve())
    if api is None:
        if options.tokens is not None:
            load_tokens(options.tokens)
        return options
    parse_address(api)
    options.access()
    return options
