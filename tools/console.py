"""``cdpfs console``: the web console over the APIs of many nodes."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import click
import trio

from cdpfs.errors import first_error

log = logging.getLogger(__name__)


@click.command("console")
@click.option("--nodes", required=True, metavar="URL,...",
              help="The nodes' API addresses, e.g. http://127.0.0.1:8470,http://b:8470 "
              "(each started with --api).")
@click.option("--listen", default="127.0.0.1:8480", show_default=True, metavar="HOST:PORT",
              help="Where the console's page is served (loopback unless --cert is given).")
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False),
              help="The console's TLS certificate (PEM).")
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False),
              help="The console's TLS key (PEM).")
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The certificate(s) the nodes' TLS is checked against (default: the "
              "system's).")
def console_cmd(nodes: str, listen: str, cert: Path | None, key: Path | None,
                ca: Path | None) -> None:
    """Serve the web console over NODES until stopped: every volume, replica and
    cluster node on one page, and the actions beside them. The page asks for a
    token of the nodes' --api-tokens files and passes it on."""
    import ssl

    from cdpfs.api.console import check_nodes, console_app
    from cdpfs.api.server import ApiOptions, serve_app

    urls = check_nodes(nodes.split(","))
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    options = ApiOptions(listen, cert=cert, key=key)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    app = console_app(urls, verify=verify, scheme="https" if cert else "http")
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_app, options, app)
                log.info("console on %s over %s", bound, ", ".join(urls))
                click.echo(f"console on {bound}", err=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


COMMANDS = [console_cmd]
