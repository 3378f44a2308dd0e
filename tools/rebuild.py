"""The rebuild command: make a lost primary again from a replica server or a send stream."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cdpfs.names import shown
from cdpfs.progress import Progress
from cdpfs.rebuild import rebuild

from .archive import PROGRESS


@click.command("rebuild")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--from", "source", required=True, metavar="HOST:PORT|FILE",
              help="A replica server ('cdpfs replica serve') that trusts STORE's "
              "certificate, or a file holding a full send stream.")
@click.option("--name", help="The name the replica's certificate is trusted under in "
              "STORE (default: its one trusted name).")
@PROGRESS
def rebuild_cmd(store: Path, source: str, name: str | None, progress: str) -> None:
    """Make the volume again in STORE (a new or empty directory, with a TLS identity
    for an address: 'cdpfs replica keygen STORE') from a replica or a send stream,
    with its identity (volume id, lineage, epochs, history, bookmarks), checked by
    tree hash; then STORE is the volume's primary. Interrupted, the same command goes
    on from where it was."""
    started = time.monotonic()
    with Progress(progress, "rebuild") as bar:
        done = rebuild(store, source, peer=name, progress=bar.advance)
    check = "checked against the sender's" if done.checked else "as received"
    click.echo(f"rebuilt {shown(store)}: volume {done.uuid} up to #{done.to_seq}, tree hash "
               f"{done.tree[:16]} ({check}), primary of epoch {done.epoch}")
    if done.finished:
        click.echo("(the rebuild was done already: only its end was left)")
    else:
        took_up = f", taking up the rebuild left at #{done.resumed}" if done.resumed else ""
        click.echo(f"received {done.records} records, {done.bytes / 2**20:.1f} MiB in "
                   f"{time.monotonic() - started:.1f}s{took_up}")
    again = (f"'cdpfs replica add {shown(store)} {done.peer} --address {shown(source)}'"
             if done.peer else "'cdpfs replica add'")
    click.echo(f"next: mount it, and register its replicas again ({again}): they follow "
               f"from #{done.to_seq}")


COMMANDS = [rebuild_cmd]
