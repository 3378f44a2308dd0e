"""The ``cdpfs`` command: init, mount, umount, verify, status.

Every command prints one clear line on error and exits non-zero; the cause
goes to the log (``-v`` shows it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from cdpfs.errors import CdpfsError, StoreLocked
from cdpfs.names import shown

from .output import echo_json, json_option
from .serving import api_from, api_options

log = logging.getLogger("cdpfs")

try:  # click 8.2 and later: a group called alone shows its help as this usage error
    from click.exceptions import NoArgsIsHelpError
except ImportError:  # pragma: no cover - click 8.1 shows it and exits 0
    class NoArgsIsHelpError(click.UsageError):  # type: ignore[no-redef]
        """Never raised by this click."""


def _setup_logging(verbose: int, logfile: Path | None = None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler: logging.Handler
    if logfile is not None:
        handler = logging.FileHandler(logfile)
        level = min(level, logging.INFO)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _Group(click.Group):
    """The ``cdpfs`` command. A subcommand's module is imported when it is called
    (a third less start-up time than importing all). Every error ends as one line
    on stderr: ``cdpfs: error: ...`` and exit status 1, or a usage error naming
    the help to see and exit status 2. An OSError or any other exception that gets
    this far is a check missing where it arose: one line too, its traceback in the
    log (``-v``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            _load(_WHERE.get(cmd_name))
        return super().get_command(ctx, cmd_name)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as exc:  # a group alone: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "cdpfs"
            _fail(f"{_sentence(exc.format_message())} (see '{where} --help')", exc.exit_code)
        except click.ClickException as exc:
            _fail(_sentence(exc.format_message()), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except CdpfsError as exc:
            _fail(str(exc), 1)
        except OSError as exc:  # no clearer message was given where it arose
            log.info("unexpected OSError", exc_info=True)
            name = exc.filename
            name = os.fsdecode(name) if isinstance(name, bytes) else name
            _fail(f"{name}: {exc.strerror}" if name is not None and exc.strerror
                  else exc.strerror or str(exc), 1)
        except Exception as exc:  # a bug: say so in one line, the traceback with -v
            log.info("internal error", exc_info=True)
            _fail(f"internal error: {type(exc).__name__}: {exc} (run with -v for the "
                  "traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


def _sentence(message: str) -> str:
    """click's message as the rest of cdpfs's lines: no capital, no full stop."""
    message = message.strip().removesuffix(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    return message


def _fail(message: str, code: int) -> NoReturn:
    """The one error line (control characters and bytes that are not UTF-8 escaped:
    it stays one line, and printing it cannot fail) and the exit."""
    click.echo(f"cdpfs: error: {shown(message)}", err=True)
    sys.exit(code)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """cdpfs: a filesystem that keeps every write, with time travel and replication."""
    ctx.obj = {"verbose": verbose}
    _setup_logging(verbose)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--block-size", default=128 * 1024, show_default=True,
              help="Logical block size in bytes (a power of two).")
def init(store: Path, block_size: int) -> None:
    """Create a new, empty store in STORE (a missing or empty directory)."""
    from cdpfs.fs.mutate import init_volume

    init_volume(store, block_size=block_size).close()
    click.echo(f"initialised cdpfs store {shown(store)}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-f", "--foreground", is_flag=True, help="Stay attached (log to stderr).")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@click.option("--log", "logfile", type=click.Path(path_type=Path),
              help="Log file of a background mount (default STORE/cdpfs.log).")
@click.option("--at", "at", metavar="MOMENT",
              help="Mount this past state alone, read-only (a time, -15m, #seq or bookmark).")
@click.option("--follow", is_flag=True,
              help="Mount the newest state read-only and follow it as another process "
              "changes the store (a replica receiving, a live mount).")
@click.option("--history", type=click.Choice(["visible", "hidden"]),
              help="List @ entries in the root directory; lookups of @ names (cd "
              "MNT/@-1h) work either way. Hidden, tools that walk the whole volume (find, "
              "du, rsync) do not walk its history. Default: as set with cdpfs config "
              "(hidden unless set).")
@click.option("--nonempty", is_flag=True,
              help="Mount on a directory that has files in it (the mount hides them).")
@api_options
@click.pass_context
def mount(ctx: click.Context, store: Path, mountpoint: Path, foreground: bool,
          allow_other: bool, logfile: Path | None, at: str | None, follow: bool,
          history: str | None, nonempty: bool, api: str | None, api_tokens: Path | None,
          api_cert: Path | None, api_key: Path | None) -> None:
    """Mount the volume in STORE on MOUNTPOINT (in the background by default).

    Durability: a write is durable once fsync(2) of its file returns (or 'cdpfs
    sync', or 'cdpfs umount'); other writes are committed within a quarter of a
    second, and a crash before that loses them. sync(1) alone does not commit: the
    kernel does not ask a FUSE mount to."""
    from cdpfs.mount.runner import check_mountpoint, mount_store
    from cdpfs.volume import preflight

    store = Path(os.path.realpath(store))  # a loop of links: the store says so below
    holder = preflight(store, at)  # clear errors before forking: not a store, a bad moment
    check_mountpoint(mountpoint, nonempty)
    serving = api_from(api, api_tokens, api_cert, api_key)
    if at is not None and follow:
        raise click.UsageError("--at and --follow exclude each other")
    if holder and at is None and not follow:
        hint = " (mount it with --follow or --at to read it)" if "replica" in holder else ""
        raise StoreLocked(f"{store}: store is in use by {holder}{hint}")

    def run(ready: object = None) -> None:
        mount_store(store, mountpoint, allow_other=allow_other, ready=ready,  # type: ignore[arg-type]
                    at=at, show_history=None if history is None else history == "visible",
                    follow=follow, nonempty=nonempty, api=serving)

    if foreground:
        _setup_logging(max(ctx.obj["verbose"], 1))
        run()
        return
    default_log = store / ("cdpfs.log" if at is None and not follow else "cdpfs-snapshot.log")
    logfile = logfile or default_log
    if logfile.exists() and not logfile.is_file():  # a FIFO: the daemon would hang
        raise CdpfsError(f"{logfile}: not a regular file (the mount's log is appended to it)")
    _daemonize(run, logfile, ctx.obj["verbose"])
    how = f" as of {at}, read-only" if at else ", read-only, following" if follow else ""
    click.echo(f"mounted {shown(store)} on {shown(mountpoint)}{shown(how)}")



def _daemonize(run: object, logfile: Path, verbose: int) -> None:
    """Run ``run(ready)`` in a detached child; return once it called ready()."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.read().decode(errors="replace").strip()
        if answer != "ok":
            raise CdpfsError(answer.removeprefix("error: ") or "mount process died on start")
        return
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _setup_logging(verbose, logfile)

    def ready() -> None:
        os.write(w, b"ok")
        os.close(w)

    code = 0
    try:
        run(ready)  # type: ignore[operator]
    except CdpfsError as exc:
        log.error("mount failed: %s", exc)
        _try_write(w, f"error: {exc}".encode())
        code = 1
    except BaseException:
        log.exception("mount process failed")
        _try_write(w, b"error: mount process failed (see the log)")
        code = 1
    logging.shutdown()
    os._exit(code)


def _try_write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
        os.close(fd)
    except OSError:
        pass


@main.command("sync")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def sync_cmd(paths: tuple[Path, ...]) -> None:
    """Make everything written to mounted volumes durable now (PATH: a mount or a path
    in one; none: every live cdpfs mount). fsync(2) of a file is durable when it
    returns; sync(1) and syncfs(2) start writing the kernel's cache into the mount
    but do not make it commit (the kernel does not ask a FUSE mount to): the mount
    commits within a quarter of a second. This command waits until what the kernel
    caches is written in (files open for writing by processes it can see are
    fsynced) and the mount has committed it."""
    from cdpfs.mount.control import cdpfs_mounts

    from .locate import Target, locate

    targets = [locate(p) for p in paths] or [
        Target(Path(m.source), Path(m.point), "", dev=m.dev) for m in cdpfs_mounts()
        if not m.read_only]
    for target in targets:
        if target.mount is None:
            raise CdpfsError(f"{shown(target.store)}: not mounted (nothing to sync)")
        target.settle(strict=True)
        click.echo(f"synced {shown(target.mount)}: everything written to it is committed")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path) -> None:
    """Commit everything written to MOUNTPOINT to the store and unmount it."""
    from cdpfs.mount.control import unmount

    unmount(mountpoint)
    click.echo(f"unmounted {shown(mountpoint)}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("replica", type=click.Path(path_type=Path), required=False)
@click.option("--compare", is_flag=True,
              help="STORE REPLICA: check both hold identical state (whole-tree hash).")
@click.option("--at", "at", type=click.IntRange(0, 2**63 - 1),
              help="With --compare: the sequence number to compare "
              "(default: the newest both have).")
@json_option
def verify(store: Path, replica: Path | None, compare: bool, at: int | None,
           as_json: bool) -> None:
    """Rehash every block and check every reference of every version.

    With --compare PRIMARY REPLICA, check instead that both stores show the same
    tree at one sequence number."""
    from cdpfs.history.verify import check

    if compare or replica is not None:
        from .replication import compare as run_compare

        if replica is None:
            raise CdpfsError("--compare needs two stores: PRIMARY REPLICA")
        run_compare(store, replica, at)
        return

    from cdpfs.history import clones

    problems = check(store, progress=lambda msg: log.info(msg))
    away = [h for h in clones.holds(store) if not h.present]
    notes = [f"#{h.seq} is held for a clone made at {shown(h.path)}, where no clone of "
             f"this store is now (moved; or removed by hand: cdpfs clone --delete "
             f"{shown(h.path)} --base {shown(store)})" for h in away]
    if as_json:
        from cdpfs.api.documents import verify_document

        echo_json(verify_document(str(store), problems, notes))
        sys.exit(1 if problems else 0)
    for note in notes:
        click.echo(f"note: {note}")
    for line in problems:
        click.echo(shown(line))
    if problems:
        click.echo(f"cdpfs: verify: {len(problems)} problem(s) found in {shown(store)}",
                   err=True)
        sys.exit(1)
    click.echo(f"{shown(store)}: ok")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@json_option
@click.option("--watch", "every", type=float, is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]",
              help="Show it again every SECONDS (2 by default) in place, until Ctrl-C.")
def status(store: Path, as_json: bool, every: float | None) -> None:
    """Show the state of STORE: journal, objects, space, and whether it is mounted."""
    from cdpfs.status import status as store_status

    if every is not None and not 0.1 <= every <= 86400:
        raise click.UsageError("--watch: from 0.1 to 86400 seconds")
    while True:
        now = store_status(store)
        if as_json:
            from cdpfs.api.documents import status_document

            echo_json(status_document(now))
        else:
            if every is not None and sys.stdout.isatty():
                click.echo("\x1b[H\x1b[2J", nl=False)  # in place: home, clear the screen
            elif every is not None:
                click.echo("")  # into a file or a pipe: one after the other
            _status_lines(store, now)
        if every is None:
            return
        try:
            time.sleep(every)
        except KeyboardInterrupt:
            return


def _status_lines(store: Path, now: Any) -> None:
    """The lines of ``cdpfs status`` (``cdpfs.status.Status``)."""
    import datetime

    from cdpfs.replication.registry import link

    from .drtest import leftovers
    s, holder, clone_of, held = now.stats, now.holder, now.clone_of, now.held
    tested, testing, evidence = now.tested, now.testing, now.kept
    replicas, lags = now.replicas, now.lags
    when = datetime.datetime.fromtimestamp(s.last_time_ns / 1e9).isoformat(timespec="seconds")
    click.echo(f"store        {shown(s.path)} ({s.uuid})")
    click.echo(f"in use       {holder or 'no'}")
    click.echo(f"journal      {s.records} records, last #{s.last_seq} at {when}")
    if now.window.oldest_seq:
        oldest = datetime.datetime.fromtimestamp(now.window.oldest_ts / 1e9)
        click.echo(f"window       back to {oldest.isoformat(timespec='seconds')} "
                   f"(#{now.window.oldest_seq}, {_ago(int(now.window.seconds * 1e9))} ago)")
    click.echo(f"objects      {s.blocks} blocks, {s.packs} packs, {s.versions} versions")
    click.echo(f"space        {s.used_bytes / 2**20:.1f} MiB used "
               f"(map {s.map_bytes / 2**20:.0f} MiB), block size {s.block_size // 1024} KiB")
    if clone_of is not None:
        click.echo(f"clone of     {shown(clone_of.path)} as of #{clone_of.seq}")
    if now.receiving:
        click.echo(f"receiving    INCOMPLETE: a receive broke off at #{s.last_seq}; resume: "
                   f"cdpfs send --resume {now.receiving} ... | cdpfs receive {shown(s.path)}")
    for h in held:
        where = "" if h.present else (
            "; no clone of this store is there now (moved, or removed by hand: then "
            f"cdpfs clone --delete {shown(h.path)} --base {shown(s.path)})")
        click.echo(f"clone        {shown(h.path)} holds #{h.seq}{where}")
    if tested is not None:
        age = (time.time_ns() - tested.ts) / 1e9
        how = (f"passed, bookmarked {tested.bookmark}" if tested.ok
               else f"FAILED: {tested.failed}" + (f" (clone kept: {tested.clone})"
                                                  if tested.clone else ""))
        due = ""
        if tested.every:
            due = (f"; OVERDUE (every {tested.every}s, two missed)"
                   if tested.overdue(time.time_ns()) else f"; every {tested.every}s")
        click.echo(f"dr test      #{tested.seq}, {age / 3600:.1f} h ago, {how}{due}")
    for path in evidence:
        if tested is None or path != tested.clone:
            click.echo(f"dr test      the clone of the last failed test is kept: {shown(path)}")
    if testing is not None and testing.alive:
        since = datetime.datetime.fromtimestamp(testing.ts / 1e9).isoformat(timespec="seconds")
        click.echo(f"dr test      running since {since} (pid {testing.pid}): clone "
                   f"{shown(testing.clone)} on {shown(testing.mnt)}")
    elif testing is not None:
        left = leftovers(testing) or ["its record"]
        click.echo(f"dr test      the test of pid {testing.pid} was killed (or crashed) and "
                   f"left {'; '.join(left)}: remove with 'cdpfs replica test {shown(store)} "
                   "--cleanup'")
    _backups(now.backed_up)
    for r in replicas:
        lag = lags[r.name]
        size = f"{'' if lag.complete else '>'}{lag.bytes / 2**20:.1f} MiB"
        view = link(r, now.at_ns, lag.records)  # rate and ETA only while records move
        eta = view.eta(lag.bytes)
        click.echo(f"replica      {r.name} ({shown(r.address)}, {r.mode}): "
                   f"{view.words()}, acked #{r.acked}, "
                   f"lag {lag.records} records / {size} / {lag.seconds:.1f}s"
                   + (f", ETA {eta:.0f}s" if eta is not None else "")
                   + f", sent {r.records_sent} records {r.bytes_sent / 2**20:.1f} MiB"
                   + (f", {view.rate / 1e6:.1f} MB/s lately" if view.moving else "")
                   + (f", last error: {shown(r.last_error)}" if r.last_error else ""))


def _backups(backed_up: Any) -> None:
    """The status lines of a store's backups (``cdpfs.backups.Schedule``): the newest
    verified one, its age and whether the schedule is OVERDUE; the last one if it
    failed. None if no backup was ever made of it."""
    last, good, now = backed_up.last, backed_up.verified, time.time_ns()
    due = ""
    if backed_up.every:
        due = (f"; OVERDUE (every {backed_up.every}s, two missed)"
               if backed_up.overdue(now) else f"; every {backed_up.every}s")
    if good is not None:
        click.echo(f"backup       last {_ago(now - good.made_at)} ago (#{good.seq}, verified, "
                   f"{good.size / 2**20:.1f} MiB, {good.format}): {shown(good.path)}"
                   + ("" if last is not None and last.failed else due))
    if last is not None and last.failed:
        click.echo(f"backup       FAILED {_ago(now - last.made_at)} ago: {shown(last.failed)}"
                   + due)


def _ago(ns: int) -> str:
    seconds = max(0.0, ns / 1e9)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f}s"


# Where each command is defined (a module of this package), so that a command
# imports only its own module; a command missing here is still found (every module
# is imported then). tests/test_t2_cli.py checks this table.
_WHERE = {
    **dict.fromkeys(["log", "diff", "restore", "rewind", "bookmark", "bookmarks", "clone",
                     "prune", "stat", "df", "retention", "config"], "timetravel"),
    **dict.fromkeys(["replica", "replicate", "assess"], "replication"),
    "ha": "ha",
    **dict.fromkeys(["export", "import"], "archive"),
    **dict.fromkeys(["send", "receive"], "streams"),
    "rebuild": "rebuild",
    **dict.fromkeys(["backup", "backups"], "backups"),
    "console": "console",
}
_MODULES = tuple(dict.fromkeys(_WHERE.values()))


def _load(module: str | None = None) -> None:
    """Add the commands of ``module`` (all of them if None) to ``main``."""
    import importlib

    for name in _MODULES if module is None else (module,):
        mod = importlib.import_module(f"{__package__}.{name}")
        for command in mod.COMMANDS:
            if command.name not in main.commands:
                main.add_command(command)
        if name == "timetravel" and "df" not in main.commands:
            main.add_command(mod.stat_cmd, "df")


if __name__ == "__main__":
    main()
