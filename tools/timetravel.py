"""The time-travel commands: log, diff, restore, rewind, bookmark(s), clone, prune, stat,
retention.

Each command's work on the store is a library function (``cdpfs.history``,
``cdpfs.volume``), called once a live mount has committed what it holds;
``restore`` and ``rewind`` copy from ``@#seq`` trees into the live tree through the
mount, so every change they make is journaled and can itself be undone.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path

import click

from cdpfs.errors import CdpfsError
from cdpfs.history import bookmarks
from cdpfs.history.moments import parse as parse_moment
from cdpfs.history.points import find as find_point
from cdpfs.history.retention import configure as configure_retention
from cdpfs.history.versions import file_versions, tree_changes
from cdpfs.names import shown
from cdpfs.scenario import Scenario
from cdpfs.volume import check_settings, configure

from .locate import Target, locate
from .output import echo_json, json_option

log = logging.getLogger(__name__)

AT_OPTION = click.option("--at", "at", required=True, metavar="MOMENT",
                         help="A time, -15m, #seq, bookmark or now.")
STORE_OPTION = click.option("--store", type=click.Path(path_type=Path),
                            help="Read this store; PATH is then relative to its volume root.")


def when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts / 1e9).isoformat(sep=" ", timespec="milliseconds")


def _point(target: Target, moment: str) -> tuple[int, int]:
    """(seq, ts) of the kept point ``moment`` names in the target's store (after its
    mount committed)."""
    target.settle()
    point = find_point(target.store, moment)
    return point.seq, point.ts


def _args(op: str, args: dict[str, object]) -> str:
    if op == "write":
        return f"{args.get('len')} bytes at {args.get('off')}"
    if op == "truncate":
        return f"to {args.get('size')}"
    if op == "rename":
        return f"{_name(args.get('name'))} -> {_name(args.get('new_name'))}"
    if "name" in args:
        return _name(args["name"])
    return ", ".join(f"{k}={v}" for k, v in args.items() if k != "kind")


def _name(raw: object) -> str:
    return shown(raw if isinstance(raw, bytes) else str(raw))


@click.command("log")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--at", "at", metavar="MOMENT", help="The file that had this path then.")
@click.option("-n", "limit", type=click.IntRange(0), default=0,
              help="Show at most N versions (0: all).")
@STORE_OPTION
@json_option
def log_cmd(path: Path, at: str | None, limit: int, store: Path | None,
            as_json: bool) -> None:
    """The versions of a file or directory: sequence, time, operation, size."""
    target = locate(path, store)
    target.settle()
    found = file_versions(target.store, target.rel, at, limit)
    if as_json:
        from cdpfs.api.documents import versions_document

        echo_json(versions_document(target.rel, found))
        return
    click.echo(f"{'seq':>10}  {'time':<23}  {'op':<11} {'size':>12}  details")
    for v in found:
        size = "(gone)" if v.node is None else str(v.node.size)
        click.echo(f"{v.seq:>10}  {when(v.ts):<23}  {v.op:<11} {size:>12}  "
                   f"{_args(v.op, v.args)}")


@click.command("diff")
@click.argument("t1")
@click.argument("t2")
@click.argument("path", type=click.Path(path_type=Path), default=".")
@STORE_OPTION
@json_option
def diff_cmd(t1: str, t2: str, path: Path, store: Path | None, as_json: bool) -> None:
    """What was added (A), changed (M), removed (D) or renamed (R) between two moments.

    T1 and T2 are moments (a time, -15m, #seq, a bookmark, or 'now')."""
    target = locate(path, store)
    target.settle()
    seq1, seq2, changes = tree_changes(target.store, t1, t2, target.rel)
    if as_json:
        from cdpfs.api.documents import changes_document

        echo_json(changes_document(seq1, seq2, changes))
        return
    for change in changes:
        click.echo(shown(str(change)))
    counts = {k: sum(c.kind == k for c in changes) for k in "AMDR"}
    click.echo(f"#{seq1} -> #{seq2}: {counts['A']} added, {counts['M']} changed, "
               f"{counts['D']} removed, {counts['R']} renamed", err=True)


def _restore(target: Target, at: str, delete: bool, rewind: bool) -> None:
    from cdpfs.mount.restore import measure, restore_tree

    live = target.live_path
    seq, ts = _point(target, at)
    mount = target.mount
    assert mount is not None
    then = mount / f"@#{seq}"
    src = then / target.rel if target.rel else then
    if not rewind and target.through_link:
        raise CdpfsError(f"{target.mount}/{target.rel}: the path goes through a symbolic link "
                         "in the volume; give the real path")
    if not os.path.lexists(src):
        raise CdpfsError(f"{target.rel or '/'}: did not exist at {at} (#{seq}, {when(ts)})")
    # Both trees are reached from their roots in the mount, never through a link or
    # another filesystem, however the live tree changes meanwhile.
    entries, nbytes = measure(src, root=then)
    skip = None if target.rel else (lambda name: name.startswith("@"))  # history at the root
    started = time.monotonic()
    from cdpfs.progress import Progress

    with Progress("auto", "restoring", nbytes) as bar:
        summary = restore_tree(src, live, src_root=then, dst_root=mount, dst_dev=target.dev,
                               delete=delete, skip_root=skip, progress=bar.advance)
    took = time.monotonic() - started
    what = "volume" if rewind else (target.rel or "/")
    click.echo(f"restored {what} to #{seq} ({when(ts)}): {entries} entries, "
               f"{summary.files_written} files rewritten ({summary.bytes_written} bytes), "
               f"{summary.created} created, {summary.replaced} replaced, "
               f"{summary.removed} removed, {summary.unchanged} unchanged, "
               f"{summary.attrs_set} with attributes reset in {took:.1f}s")
    if summary.extras_kept:
        click.echo(f"{summary.extras_kept} entries that did not exist then were kept "
                   "(use --delete to remove them)")
    for line in summary.warnings:
        click.echo(f"cdpfs: warning: {line}", err=True)
    if summary.warnings:
        raise CdpfsError(f"{len(summary.warnings)} entries could not be restored")


@click.command("restore")
@click.argument("path", type=click.Path(path_type=Path))
@AT_OPTION
@click.option("--delete", is_flag=True, help="Remove entries that did not exist then.")
def restore_cmd(path: Path, at: str, delete: bool) -> None:
    """Put PATH (a file or a directory tree in a mounted volume) back as it was AT."""
    _restore(locate(path, entry=True), at, delete, rewind=False)


@click.command("rewind")
@click.argument("volume", type=click.Path(path_type=Path))
@AT_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def rewind_cmd(volume: Path, at: str, yes: bool) -> None:
    """Put the whole mounted VOLUME back as it was AT (as new changes: undoable)."""
    target = locate(volume).whole()
    live = target.live_path
    seq, ts = _point(target, at)
    if not yes and not click.confirm(f"Rewind everything in {live} to #{seq} ({when(ts)})? "
                                     "Files created since will be removed", err=True):
        raise CdpfsError("rewind cancelled")
    _restore(target, f"#{seq}", delete=True, rewind=True)


@click.command("bookmark")
@click.argument("name")
@click.option("--at", "at", metavar="MOMENT", help="Name a past point instead of now.")
@click.option("--delete", is_flag=True, help="Delete the bookmark NAME.")
@click.option("--volume", type=click.Path(path_type=Path), default=".", show_default=True,
              help="A store, or a path in a mounted volume.")
@click.option("--scenario", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A TOML file of commands to run before and after (consistency hooks).")
@click.option("--set", "variables", multiple=True, metavar="KEY=VALUE",
              help="A variable for the scenario's commands (repeatable).")
def bookmark_cmd(name: str, at: str | None, delete: bool, volume: Path,
                 scenario: Path | None, variables: tuple[str, ...]) -> None:
    """Name a point in history (now, or --at a moment); bookmarks are kept until deleted."""
    target = locate(volume)
    if delete:
        bookmarks.remove(target.store, name)
        click.echo(f"deleted bookmark {name}")
        return
    hooks = Scenario.load(scenario, variables) if scenario else None
    if hooks and at is not None:

        raise CdpfsError("--scenario prepares the volume now; it cannot be used with --at")
    cwd = target.mount or Path.cwd()
    env = {"CDPFS_BOOKMARK": name, "CDPFS_STORE": str(target.store),
           "CDPFS_MOUNT": str(target.mount or "")}
    if hooks:
        hooks.run("before", cwd, env)
    try:
        target.settle()
        mark, ts = bookmarks.add(target.store, name, at)
    finally:
        if hooks:
            hooks.run("after", cwd, env)
    click.echo(f"bookmark {mark.name} -> #{mark.seq} ({when(ts)})")


@click.command("bookmarks")
@click.option("--volume", type=click.Path(path_type=Path), default=".", show_default=True,
              help="A store, or a path in a mounted volume.")
def bookmarks_cmd(volume: Path) -> None:
    """List the bookmarks of a volume."""
    target = locate(volume)
    target.settle()
    for mark, ts in bookmarks.listed(target.store):
        click.echo(f"{mark.name:<24} #{mark.seq:<10} {when(ts)}")


@click.command("prune")
@click.argument("volume", type=click.Path(path_type=Path))
def prune_cmd(volume: Path) -> None:
    """Apply the retention policy now: free what no kept point needs."""
    from cdpfs.volume import prune_volume

    target = locate(volume)
    target.settle()
    r = prune_volume(target.store)
    click.echo(f"pruned {shown(target.store)}: {r.versions} versions, {r.records} journal records, "
               f"{r.blocks} blocks and {r.packs} packs ({r.bytes_freed / 2**20:.1f} MiB of "
               f"data) in {r.seconds:.1f}s; {r.kept_points} older points kept, "
               f"everything from #{r.full_from} on")


@click.command("stat")
@click.argument("volume", type=click.Path(path_type=Path))
@json_option
def stat_cmd(volume: Path, as_json: bool) -> None:
    """Space and history of a volume: live data, history, dedup, compression."""
    from cdpfs.history.stats import space

    target = locate(volume)
    target.settle()
    s = space(target.store)
    if as_json:
        from cdpfs.api.documents import space_document

        echo_json(space_document(s))
        return

    def mib(n: int) -> str:
        return f"{n / 2**20:,.1f} MiB"

    if s.clone_of is not None:
        click.echo(f"clone of         {shown(s.clone_of)} as of #{s.clone_seq} "
                   f"({when(s.clone_ts)}); adds {s.records - 1} records and "
                   f"{mib(s.stored_bytes)} stored of its own")
    click.echo(f"live data        {mib(s.live_bytes)} in {s.live_files} files "
               f"({mib(s.live_stored)} stored)")
    click.echo(f"history          {mib(s.history_stored)} stored for older versions")
    click.echo(f"stored           {mib(s.stored_bytes)} of blocks and packs; "
               f"{mib(s.file_bytes)} store file")
    click.echo(f"free             {mib(s.free_inside)} inside the store file (new data "
               f"goes there first), {mib(s.disk_free)} on the disk")
    click.echo(f"dedup            {s.dedup_ratio:.2f}x (live file bytes / unique block bytes)")
    click.echo(f"compression      {s.compression_ratio:.2f}x (block bytes / stored bytes)")
    click.echo(f"oldest point     {when(s.oldest_ts)} (#{s.oldest_seq})")
    click.echo(f"journal          {s.records} records, newest #{s.last_seq} at {when(s.last_ts)}")
    click.echo(f"retention        {s.policy}")


@click.command("clone")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("clone", type=click.Path(path_type=Path), required=False)
@click.option("--at", "at", metavar="MOMENT",
              help="The moment to clone: a time, -15m, #seq or bookmark (default: now).")
@click.option("--delete", is_flag=True, help="Delete the clone STORE and release its hold.")
@click.option("--base", type=click.Path(path_type=Path),
              help="With --delete, for a clone removed by hand: release the hold BASE "
              "keeps for it.")
def clone_cmd(store: Path, clone: Path | None, at: str | None, delete: bool,
              base: Path | None) -> None:
    """Make CLONE, a writable copy of the volume in STORE as it was at a moment, in
    constant time: CLONE keeps its own changes and reads the rest from STORE, which
    keeps that moment (a hold) until the clone is deleted, wherever it is moved.
    Mount it with cdpfs mount CLONE MNT.

    With --delete: remove the clone STORE (cdpfs clone --delete CLONE), or release
    the hold of one removed by hand (cdpfs clone --delete CLONE --base BASE)."""
    from cdpfs.history import clones

    if base is not None and not delete:
        raise click.UsageError("--base goes with --delete: "
                               "cdpfs clone --delete CLONE --base BASE")
    if delete:
        if clone is not None or at is not None:
            raise click.UsageError("--delete takes the clone alone: cdpfs clone --delete CLONE")
        if base is not None:
            gone = clones.forget(base, store)
            click.echo(f"released the hold {shown(gone.base)} kept for the clone removed from "
                       f"{shown(gone.path)} (#{gone.seq})")
            return
        gone = clones.delete(store)
        click.echo(f"deleted clone {shown(gone.path)} (of {shown(gone.base)} as of #{gone.seq}); "
                   "its hold on the base is released")
        return
    if clone is None:
        raise click.UsageError("give the store and the clone to make: cdpfs clone STORE CLONE")
    if at is not None:
        parse_moment(at)  # '' is no moment here either (as for mount --at)
    _check_clone_path(clone)
    target = locate(store)
    if target.rel:
        raise CdpfsError(f"{store}: give the store or the mount point, not a path inside it")
    target.settle()
    made = clones.make(target.store, clone, at)
    click.echo(f"cloned {shown(made.base)} as of #{made.seq} ({when(made.ts)}) into "
               f"{shown(made.path)}")


def _check_clone_path(clone: Path) -> None:
    """A clone at ``clone`` could be mounted and held: refused (one line) if not."""
    from cdpfs.mount.control import check_source

    path = Path(os.path.abspath(clone))
    try:  # a name too long, a directory not searchable: said before anything is made
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CdpfsError(f"{clone}: {exc.strerror}") from None
    real = Path(os.path.realpath(path.parent)) / path.name  # what a mount would name
    for p in (path, real):
        check_source(p)
    # The base holds the clone's point under a key naming the clone's path, and an
    # LMDB key is at most 511 bytes.
    if len(os.fsencode(f"{bookmarks.CLONE_HOLD}{path}")) > 511:
        raise CdpfsError(f"{clone}: path too long for a clone (its base could not hold its "
                         f"point): at most {511 - len(bookmarks.CLONE_HOLD)} bytes")


@click.command("retention")
@click.argument("volume", type=click.Path(path_type=Path))
@click.option("--keep-all", help="Keep every write for this long (e.g. 24h).")
@click.option("--minutely", help="Then one point per minute up to this age (e.g. 7d).")
@click.option("--hourly", help="Then one point per hour up to this age (e.g. 30d).")
@click.option("--daily", help="Then one point per day up to this age (e.g. 1y).")
@click.option("--prune-interval", help="How often a mount prunes (e.g. 1h).")
@click.option("--replica-max-lag", type=click.IntRange(0, 2**62), metavar="RECORDS",
              help="Keep journal for a replica at most this many records behind; one "
              "further behind gets a full resync when it comes back.")
def retention_cmd(volume: Path, keep_all: str | None, minutely: str | None,
                  hourly: str | None, daily: str | None, prune_interval: str | None,
                  replica_max_lag: int | None) -> None:
    """Show or set the retention policy of a volume."""
    target = locate(volume)
    try:
        new, every = configure_retention(
            target.store, keep_all=keep_all, minutely=minutely, hourly=hourly, daily=daily,
            prune_interval=prune_interval, replica_max_lag=replica_max_lag)
    except ValueError as exc:
        raise CdpfsError(str(exc)) from None
    click.echo(f"retention: {new.describe()}; a mount prunes every {every}s")


@click.command("config")
@click.argument("volume", type=click.Path(path_type=Path))
@click.argument("settings", nargs=-1, metavar="[NAME=VALUE]...")
def config_cmd(volume: Path, settings: tuple[str, ...]) -> None:
    """Show or set a volume's settings: history=hidden|visible (whether the root
    lists @ entries; a mount's --history overrides it). Mounts read them when they
    start."""
    changes = {}
    for item in settings:
        name, _, value = item.partition("=")
        try:
            check_settings({name: value})
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        changes[name] = value
    target = locate(volume)
    for name, value in configure(target.store, changes).items():
        click.echo(f"{name}={value}")
    if changes and target.mount is not None:
        click.echo("a running mount takes the new settings when it is mounted again")


COMMANDS = [log_cmd, diff_cmd, restore_cmd, rewind_cmd, bookmark_cmd, bookmarks_cmd,
            clone_cmd, prune_cmd, stat_cmd, retention_cmd, config_cmd]
