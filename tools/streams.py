"""The stream commands: ``send`` a stretch of a volume's history, ``receive`` one.

``send`` reads the store (a store directory, a replica's while it receives, or
the store of a live mount, which first commits what it has) without its writer
lock, holding the points it sends. A stream written to a file goes to a
temporary name beside it and is renamed into place once complete (as an
archive is: ``archive._Output``). ``receive`` applies a stream to a store it
locks; one that breaks off keeps what arrived and prints the resume token for
``send --resume``. The work is ``replication.stream``'s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from cdpfs.errors import CdpfsError
from cdpfs.history.moments import parse as parse_moment
from cdpfs.names import shown

from .archive import PROGRESS, _input, _Output, _stop_on_sigterm
from .locate import locate


@click.command("send")
@click.argument("volume", type=click.Path(path_type=Path), metavar="STORE|MOUNTPOINT")
@click.option("--from", "start", metavar="MOMENT",
              help="Send only what came after this kept point (an incremental stream: "
                   "the receiving store must have it); default: the whole kept history.")
@click.option("--to", "end", metavar="MOMENT", help="The newest point sent (default: now).")
@click.option("--every-point/--ends", "every", default=True, show_default=True,
              help="Keep every point between the two (like zfs send -I), or only the two "
                   "ends (a smaller stream: only what is newest at --to goes).")
@click.option("--resume", metavar="TOKEN",
              help="Continue a receive that broke off, from the token it printed.")
@click.option("-o", "--output", default="-", show_default=True, metavar="FILE|-",
              help="Write the stream to FILE (or - for standard output).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--check-tree/--no-check-tree", "tree", default=None,
              help="End the stream with the tree hash at --to, which the receiver checks "
                   "(reads the volume at --to once more; default: for full streams).")
@PROGRESS
def send_cmd(volume: Path, start: str | None, end: str | None, every: bool,
             resume: str | None, output: str, force: bool, tree: bool | None,
             progress: str) -> None:
    """Write a stream of the volume's history: every change between two kept points
    with the blocks they need, as stored (compressed, each checked by its hash on
    arrival), for 'cdpfs receive'. Works on a replica store while it receives.

    \b
    cdpfs send /srv/vol -o vol.full
    cdpfs send /srv/vol --from nightly-1 --to nightly-2 | ssh host cdpfs receive /backup/vol
    cdpfs send /srv/vol --resume cdpfs-resume-... | ssh host cdpfs receive /backup/vol"""
    from cdpfs.progress import Progress
    from cdpfs.replication.stream import send_file

    if resume is not None and (start or end or not every):
        raise CdpfsError("--resume continues the stream its token names: give no "
                         "--from, --to or --ends with it")
    for moment in (start, end):
        if moment is not None:
            parse_moment(moment)  # malformed: fails before anything is opened
    target = locate(volume)
    if target.rel:
        raise CdpfsError(f"{shown(volume)}: give the store or the mount point, not a path "
                         "inside it")
    out = _Output(output, force)
    started = time.monotonic()
    with _stop_on_sigterm():
        target.settle()  # a live mount commits what it has first
        try:
            with out as file, Progress(progress, "send") as bar:
                result = send_file(target.store, file, start=start, end=end,
                                   ends=not every, resume=resume, tree=tree,
                                   progress=bar.advance)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise CdpfsError("the reader of the stream went away before it was complete "
                             "(broken pipe); resume with the token its receive printed"
                             ) from None
    took = max(time.monotonic() - started, 1e-9)
    click.echo(f"sent #{result.to_seq} to {out.name}: {result.records} records, "
               f"{result.pieces} blocks and packs, {result.bytes / 2**20:.1f} MiB in "
               f"{took:.1f}s ({result.bytes / took / 1e6:.0f} MB/s)", err=out.path is None)


@click.command("receive")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("-i", "--input", "source", default="-", show_default=True, metavar="FILE|-",
              help="Read the stream from FILE (or - for standard input).")
@click.option("--new-volume", is_flag=True,
              help="Make STORE a volume of its own from a full stream of another "
                   "(a new volume id), instead of a copy of that volume.")
@PROGRESS
def receive_cmd(store: Path, source: str, new_volume: bool, progress: str) -> None:
    """Apply a stream from 'cdpfs send' to STORE: a full stream makes a new store (a
    copy of the volume with every point the stream carries: mount it read-only,
    clone it, verify it, promote it with 'cdpfs replica promote'); an incremental one
    extends the store that has its starting point. A stream that breaks off keeps
    what arrived and prints the token to resume it with 'cdpfs send --resume'."""
    from cdpfs.mount.control import check_source
    from cdpfs.progress import Progress
    from cdpfs.replication.stream import StreamError, receive_file

    check_source(Path(os.path.abspath(store)))  # a store that could never be mounted
    started = time.monotonic()
    try:
        with _stop_on_sigterm(), _input(source, "a stream") as inp, \
                Progress(progress, "receive") as bar:
            result = receive_file(store, inp, new_volume=new_volume, progress=bar.advance)
    except StreamError as exc:
        if exc.token:
            raise CdpfsError(f"{exc}; resume with: cdpfs send --resume {exc.token} "
                             "(piped into cdpfs receive again)") from None
        raise
    took = max(time.monotonic() - started, 1e-9)
    made = "made" if result.created else "extended"
    click.echo(f"received into {shown(store)} ({made}): up to #{result.to_seq}, "
               f"{result.records} records, {result.pieces} blocks and packs, "
               f"{result.bytes / 2**20:.1f} MiB in {took:.1f}s"
               + (f"; tree hash {result.tree[:16]} checked" if result.tree else ""))


COMMANDS = [send_cmd, receive_cmd]
