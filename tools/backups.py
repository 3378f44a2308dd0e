"""Backups into a directory: ``cdpfs backup`` makes one, verified before it counts (what
``replica serve --backup-every`` runs on a schedule); ``cdpfs backups`` lists a
directory's, with their points, sizes and whether they verified."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from cdpfs.backups import FORMATS, backup, listing
from cdpfs.history.points import point_name
from cdpfs.names import shown

from .output import echo_json, json_option


@click.command("backup")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--to", "directory", required=True, type=click.Path(path_type=Path),
              help="The directory of the backups (it must exist).")
@click.option("--keep", type=click.IntRange(0, 10**6), default=0, show_default=True,
              help="Keep the newest N verified backups of the volume there, deleting "
              "older ones (0: keep all).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="send",
              show_default=True, help="send: a send stream of the whole kept history "
              "(cdpfs receive makes a store of it).")
@click.option("--nice", "niceness", type=click.IntRange(0, 19), default=10, show_default=True,
              help="Run at this lower CPU priority, so that a replica server or a mount "
              "of the store keeps up meanwhile.")
@click.option("--every", type=click.IntRange(0), default=0, hidden=True,
              help="Seconds between scheduled backups (replica serve --backup-every).")
def backup_cmd(store: Path, directory: Path, keep: int, fmt: str, niceness: int,
               every: int) -> None:
    """Back STORE up into DIRECTORY as of its newest point, while it is served: the
    backup is read back and checked against the tree hash of its point before it
    counts; a failed one leaves no file there."""
    os.nice(niceness)
    # Stopped with SIGINT (a replica server stopping), it removes what it wrote and
    # records itself as interrupted: also when started with SIGINT ignored (nohup, &).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    made = backup(store, directory, fmt=fmt, keep=keep, every=every)
    click.echo(f"backup of {shown(store)} at #{made.seq} ({point_name(made.point_ts)}) "
               f"verified: {shown(made.path)}, {made.size / 2**20:.1f} MiB in "
               f"{made.seconds:.1f}s")


@click.command("backups")
@click.argument("directory", type=click.Path(path_type=Path))
@json_option
def backups_cmd(directory: Path, as_json: bool) -> None:
    """List the backups in DIRECTORY, newest last: the point, its sequence number,
    the size, whether it verified, the format and the file."""
    found = listing(directory)
    if as_json:
        from cdpfs.api.documents import backup_listing_document

        echo_json(backup_listing_document(str(directory), found))
        return
    if not found:
        click.echo(f"no backups in {shown(directory)}")
    for b in found:
        r = b.record
        point = f"{point_name(r.point_ts)}  #{r.seq}" if r is not None else "?  #?"
        click.echo(f"{point}  {b.size / 2**20:.1f} MiB  {b.state()}  "
                   f"{r.format if r is not None else '?'}  {shown(b.path.name)}")


COMMANDS = [backup_cmd, backups_cmd]
