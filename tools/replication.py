"""The replication commands: replica keygen/trust/serve/add, replicate, and verify --compare."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import trio

from cdpfs.backups import FORMATS
from cdpfs.errors import CdpfsError, first_error
from cdpfs.ha import roles
from cdpfs.history.treehash import compare as tree_compare
from cdpfs.mount.control import live_mount_of
from cdpfs.names import check_name, shown
from cdpfs.replication import credentials, registry
from cdpfs.replication.protocol import parse_address
from cdpfs.replication.receiver import ROLE_REPLICA
from cdpfs.replication.registry import ReplicaState
from cdpfs.replication.sender import tls_connect
from cdpfs.store.lmdb import is_store
from cdpfs.volume import Mode, Volume

from .output import echo_json, json_option
from .serving import api_from, api_options

log = logging.getLogger(__name__)

BACKUP_RETRY = 300  # seconds: a scheduled backup that failed is tried again this soon


@click.group("replica")
def replica() -> None:
    """Replica stores: credentials, serving, registration."""


@replica.command("keygen")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--name", help="A name for this side in its certificate (default: the host).")
@click.option("--force", is_flag=True, help="Replace an existing identity.")
def keygen_cmd(store: Path, name: str | None, force: bool) -> None:
    """Make STORE's TLS identity (STORE may not exist yet: a future replica)."""
    import socket

    cert = credentials.keygen(store, name or socket.gethostname(), force=force)

    click.echo(f"{shown(cert)}  {credentials.fingerprint(cert.read_bytes())}")
    click.echo(f"give {shown(cert)} to the other side: cdpfs replica trust THEIR_STORE {cert.name} "
               "--name NAME")


@replica.command("trust")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.argument("cert", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--name", required=True, help="The peer's name (a replica name on a primary).")
def trust_cmd(store: Path, cert: Path, name: str) -> None:
    """Let the peer whose certificate is CERT connect to (or serve) STORE."""
    click.echo(f"{shown(store)} trusts {name}: {credentials.trust(store, cert, name)}")


@replica.command("serve")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address to listen on.")
@click.option("--failback", is_flag=True,
              help="Follow a primary whose history parted from this store's (an old "
                   "primary rejoining): what only this store has is first copied to "
                   "STORE.diverged-<epoch>-<time>, then taken out.")
@click.option("--test-every", metavar="DURATION",
              help="Run a DR test (cdpfs replica test) this often, e.g. 1d; needs "
              "--test-scenario.")
@click.option("--test-scenario", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The scenario of the scheduled DR tests.")
@click.option("--test-set", "test_vars", multiple=True, metavar="KEY=VALUE",
              help="A variable of the DR test scenario.")
@click.option("--test-allow-other", is_flag=True,
              help="Mount the DR tests' clones for other users too.")
@click.option("--backup-every", metavar="DURATION",
              help="Back the store up this often (cdpfs backup), e.g. 1d; needs --backup-to.")
@click.option("--backup-to", type=click.Path(path_type=Path),
              help="The directory of the scheduled backups (it must exist).")
@click.option("--keep", type=click.IntRange(0, 10**6),
              help="Keep the newest N verified backups there (default: all).")
@click.option("--format", "backup_format", type=click.Choice(FORMATS),
              help="Of the scheduled backups (default: send).")
@api_options
def serve_cmd(store: Path, listen: str, failback: bool, test_every: str | None,
              test_scenario: Path | None, test_vars: tuple[str, ...],
              test_allow_other: bool, backup_every: str | None, backup_to: Path | None,
              keep: int | None, backup_format: str | None, api: str | None,
              api_tokens: Path | None, api_cert: Path | None, api_key: Path | None) -> None:
    """Receive a primary's changes into STORE (created on first contact); runs until stopped."""
    from cdpfs.scenario import Scenario

    parse_address(listen)
    serving = api_from(api, api_tokens, api_cert, api_key)
    every = 0
    if test_every is not None or test_scenario is not None:
        if test_every is None or test_scenario is None:
            raise click.UsageError("--test-every and --test-scenario go together")
        every = _period("--test-every", test_every)
        Scenario.load(test_scenario, test_vars)  # a bad scenario fails here, not a day later
    backup_period = 0
    if backup_every is not None or backup_to is not None or keep is not None or \
            backup_format is not None:
        if backup_every is None or backup_to is None:
            raise click.UsageError("--backup-every and --backup-to go together (--keep and "
                                   "--format with them)")
        backup_period = _period("--backup-every", backup_every)
        if not backup_to.is_dir():
            raise CdpfsError(f"--backup-to {backup_to}: no such directory")
    ctx = credentials.server_context(store)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)
    test = ["replica", "test", str(store.resolve()), "--scenario", str(test_scenario),
            "--every", str(every), *(f"--set={v}" for v in test_vars),
            *(["--allow-other"] if test_allow_other else [])]
    backup = ["backup", str(store.resolve()), "--to", str(backup_to and backup_to.resolve()),
              "--keep", str(keep or 0), "--format", backup_format or "send",
              "--every", str(backup_period)]

    async def main() -> None:
        with trio.open_signal_receiver(2, 15) as signals:
            async with trio.open_nursery() as nursery:
                volume = Volume(store, Mode.REPLICA, listen=listen, server_ctx=ctx,
                                failback=failback)
                await nursery.start(volume.run)
                scheduled = {}
                if every:
                    scheduled["drtest"] = _Scheduled(volume, "DR test", every, _last_test,
                                                     test, _stop_test)
                if backup_period:
                    scheduled["backup"] = _Scheduled(volume, "backup", backup_period,
                                                     _last_backup, backup, _stop_backup,
                                                     BACKUP_RETRY)
                for job in scheduled.values():
                    nursery.start_soon(job.run)
                if serving is not None:
                    from cdpfs.api.app import Served
                    from cdpfs.api.server import serve_api

                    actions = {name: job.now for name, job in scheduled.items()}
                    await nursery.start(serve_api, serving,
                                        Served(volume, "replica server", actions))
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    _run(main)


def _period(option: str, text: str) -> int:
    """The seconds of a schedule's period (CdpfsError, one line, if not one)."""
    from cdpfs.history.retention import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise CdpfsError(str(exc)) from None
    if seconds <= 0:
        raise CdpfsError(f"{option} {text}: must be longer than 0s")
    return seconds


def _last_test(store: Any) -> int | None:
    """When the last DR test recorded in the served store started (ns)."""
    from cdpfs.drtests import last

    done = last(store)
    return None if done is None else done.ts


def _last_backup(store: Any) -> int | None:
    """When the last backup recorded in the served store started (ns)."""
    from cdpfs.backups import schedule

    done = schedule(store).last
    return None if done is None else done.made_at


class _Scheduled:
    """Run ``cdpfs ARGS`` (as its own process, at its own lower priority: a DR test
    mounts a clone, a backup reads the whole volume) every ``every`` seconds, start
    to start (one that took longer is followed at once), once the replica store
    exists; the first ``every`` after the start of the last one recorded in the
    store (``last``; at once if that is longer ago, or there was none); one that
    failed again ``retry`` seconds after its start if that is sooner; and at once
    when asked (``now``: the node API's action). ``stop`` stops one under way when
    the server stops."""

    def __init__(self, volume: Volume, what: str, every: int,
                 last: Callable[[Any], int | None], args: list[str],
                 stop: Callable[[trio.Process], Awaitable[None]], retry: int = 0) -> None:
        self.volume, self.what, self.every, self.last = volume, what, every, last
        self.args, self.stop, self.retry = args, stop, retry
        self.running = False
        self._asked = trio.Event()

    async def now(self, body: dict[str, Any], caller: Any) -> dict[str, Any]:
        """Start one now (the node API's action): refused while one runs."""
        from cdpfs.api.app import Refused

        if self.running:
            raise Refused(f"a {self.what} is under way already")
        if self.volume.store is None:
            raise Refused("the replica has no store yet (no primary has connected)")
        log.info("%s of %s asked for by %s", self.what, self.volume.path,
                 getattr(caller, "name", "") or "the API")
        self._asked.set()
        return {"started": True, "what": self.what}

    async def run(self) -> None:
        from .drtest import CLI

        volume = self.volume
        assert volume.receiver is not None
        await volume.receiver.store_ready.wait()
        done = await trio.to_thread.run_sync(self.last, volume.receiver.store)
        due = time.time() + (0 if done is None else
                             self.every - (time.time_ns() - done) / 1e9)
        while True:
            with trio.move_on_after(max(0.0, due - time.time())):
                await self._asked.wait()
            self._asked = trio.Event()
            started = time.time()
            log.info("scheduled %s of %s starting", self.what, volume.path)
            self.running = True
            try:
                # Its output goes to a file, not a pipe: a pipe would close as the server
                # stops, and the child, cleaning up then, would fail writing to it.
                with tempfile.TemporaryFile() as out:
                    proc = await trio.run_process([*CLI, *self.args], check=False,
                                                  stdout=out, stderr=subprocess.STDOUT,
                                                  deliver_cancel=self.stop)
                    out.seek(0)
                    said = out.read().decode(errors="replace").strip().splitlines()
            finally:
                self.running = False
            log.log(logging.INFO if proc.returncode == 0 else logging.WARNING,
                    "scheduled %s: %s", self.what,
                    said[-1] if said else f"exit {proc.returncode}")
            due = started + (min(self.every, self.retry) if proc.returncode and self.retry
                             else self.every)


async def _stop_test(proc: trio.Process) -> None:
    """Stop a scheduled test as the server stops: SIGTERM, on which it cleans up (its
    stop steps, unmount, the clone); SIGKILL if that takes over a minute (what it
    leaves, the next test removes)."""
    proc.terminate()
    await trio.sleep(60)
    proc.kill()


async def _stop_backup(proc: trio.Process) -> None:
    """Stop a scheduled backup as the server stops: SIGINT, on which it removes what
    it wrote and records itself as interrupted; SIGKILL if that takes over a minute
    (what it leaves, the next backup there removes)."""
    proc.send_signal(signal.SIGINT)
    await trio.sleep(60)
    proc.kill()


def _run(main: Any, *args: Any) -> Any:
    """trio.run, with the first real error of a nursery raised as itself."""
    try:
        return trio.run(main, *args)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


@replica.command("promote")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
def promote_cmd(store: Path) -> None:
    """Make replica STORE the primary by hand (without a cluster: for one in etcd,
    'cdpfs ha promote'). Stop its replica server first. It starts a new epoch, so
    every replica that follows it refuses the old primary from then on; mount it
    to write, and register its replicas with 'cdpfs replica add'."""
    if not is_store(store):
        raise CdpfsError(f"{store}: not a cdpfs store")
    if roles.role(store) != ROLE_REPLICA:
        raise CdpfsError(f"{store} is not a replica: it is the primary already")
    epoch = roles.promote(store)
    click.echo(f"{shown(store)} is the primary now, epoch {epoch}: mount it; an old primary that "
               f"comes back must be demoted ('cdpfs replica demote') before it serves")


@replica.command("demote")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
def demote_cmd(store: Path) -> None:
    """Make STORE (an old primary, unmounted) a replica: it ships nowhere and can be
    served ('cdpfs replica serve --failback') to follow the new primary; what it
    wrote that the new primary lacks is kept in a copy beside it."""
    if not is_store(store):
        raise CdpfsError(f"{store}: not a cdpfs store")
    if roles.role(store) == ROLE_REPLICA:
        raise CdpfsError(f"{store} is a replica already")
    forgot = roles.demote(store)
    click.echo(f"{shown(store)} is a replica now" + (f" (it no longer ships to {', '.join(forgot)})"
                                             if forgot else ""))


@replica.command("add")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.argument("name")
@click.option("--address", required=True, metavar="HOST:PORT")
@click.option("--mode", type=click.Choice(["async", "sync", "manual"]), default="async",
              show_default=True, help="manual: a mount does not ship to it; only "
              "'cdpfs replicate' does.")
@click.option("--limit", default="0", show_default=True,
              help="Bandwidth limit on the wire, bytes per second (k, M, G suffixes); 0: none.")
def add_cmd(store: Path, name: str, address: str, mode: str, limit: str) -> None:
    """Register (or change) replica NAME of STORE; a mount ships to it while it runs
    (STORE must trust NAME's certificate: cdpfs replica trust STORE CERT --name NAME)."""
    check_name(name, "replica")
    parse_address(address)
    rate = parse_rate(limit)
    registry.register(store, name, address, mode, rate)
    click.echo(f"replica {name} of {shown(store)}: {address}, {mode}"
               + (f", limited to {rate} bytes/s" if rate else ""))


@replica.command("remove")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.argument("name")
def remove_cmd(store: Path, name: str) -> None:
    """Forget replica NAME of STORE: nothing is shipped to it any more (a running mount
    stops within a second) and retention no longer keeps journal for it."""
    registry.unregister(store, name)
    click.echo(f"replica {name} removed from {shown(store)}: nothing is shipped to it any more, "
               "and its journal is no longer held")


MAX_RATE = 10**12  # bytes per second (1 TB/s): more is a typo


def parse_rate(text: str) -> int:
    """Bytes per second in ``500k``, ``10M``, ``1.5G`` (``b/s`` or ``/s`` may follow)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower().removesuffix("b/s").removesuffix("/s")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "kmg" else (t, "")
    if not re.fullmatch(r"\d+(\.\d+)?", num):
        raise CdpfsError(f"{text!r}: a rate is a number of bytes per second, "
                         "optionally with k, M or G")
    rate = float(num) * units[unit]  # inf for hundreds of digits: refused here
    if not rate <= MAX_RATE:
        raise CdpfsError(f"{text!r}: a rate is at most 1000G (bytes per second)")
    return int(rate)


@click.command("replicate")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.option("--to", "address", metavar="HOST:PORT", help="The replica's address.")
@click.option("--name", help="The replica's name (as trusted / added).")
@click.option("--follow", is_flag=True, help="Keep shipping new changes until stopped.")
@click.option("--attempts", default=5, show_default=True, type=click.IntRange(0, 10**6),
              help="Give up after this many failed connections in a row (0: never).")
def replicate_cmd(store: Path, address: str | None, name: str | None, follow: bool,
                  attempts: int) -> None:
    """Ship STORE's changes to a replica, without a mount (until it has everything)."""
    if name is not None:
        check_name(name, "replica")
    registered, last = registry.overview(store)
    states = {s.name: s for s in registered}
    if name is None:
        names = credentials.trusted_names(store)
        if address is None or len(names) != 1:
            raise CdpfsError("give --name NAME (the name the replica's certificate is "
                             f"trusted under: {', '.join(names) or 'none yet'})")
        name = names[0]
    if address is None:
        if name not in states:
            raise CdpfsError(f"replica {name!r} has no address yet: give --to HOST:PORT "
                             "or add it with 'cdpfs replica add'")
        address = states[name].address
    mount = live_mount_of(store.resolve())
    if mount is not None and name in states and states[name].mode != "manual":
        raise CdpfsError(f"{store} is mounted on {mount}, which ships to {name} itself "
                         "(see cdpfs status)")
    connect = tls_connect(address, credentials.client_context(store, name))
    known = states.get(name) or ReplicaState(name, address)
    started = time.monotonic()
    from tqdm import tqdm

    with tqdm(total=max(0, last - known.acked), unit="records", desc=f"to {name}",
              leave=False, disable=None, file=sys.stderr) as bar:
        done = known.acked

        def progress(state: ReplicaState) -> None:
            nonlocal done
            bar.update(max(0, state.acked - done))
            done = state.acked

        async def main() -> ReplicaState:
            async with trio.open_nursery() as nursery:
                volume = await nursery.start(Volume(store, Mode.SOURCE).run)
                sender = await volume.ship(name, address, connect, follow=follow,
                                           attempts=attempts, on_batch=progress)
                nursery.cancel_scope.cancel()
            return sender.state

        s = _run(main)
    records, sent = s.records_sent - known.records_sent, s.bytes_sent - known.bytes_sent
    click.echo(f"replica {s.name} at #{s.acked}: {records} records "
               f"(from #{s.acked - records + 1 if records else s.acked}), "
               f"{sent / 2**20:.1f} MiB sent in {time.monotonic() - started:.1f}s")


def compare(primary: Path, replica_path: Path, at: int | None) -> None:
    """Check that two stores hold the same volume state at one seq (whole-tree hash)."""
    seq, n, digest = tree_compare(primary, replica_path, at)
    click.echo(f"identical at #{seq}: {n} entries, tree hash {digest[:16]}")


@replica.command("test")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.option("--scenario", "scenario_path",
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The scenario whose [[test]] steps check the application.")
@click.option("--set", "variables", multiple=True, metavar="KEY=VALUE",
              help="A variable of the scenario.")
@click.option("--at", "at", metavar="MOMENT", help="The moment to test (default: the newest).")
@click.option("--primary", type=click.Path(path_type=Path, exists=True),
              help="The primary's store, where this machine can read it: the tested "
              "point's tree hash must match its own.")
@click.option("--keep-failed/--no-keep-failed", default=True, show_default=True,
              help="Keep the clone of a failed test for inspection.")
@click.option("--allow-other", is_flag=True,
              help="Mount the clone for other users too (an application run as its own "
              "user, such as PostgreSQL).")
@click.option("--nice", "niceness", type=click.IntRange(0, 19), default=10, show_default=True,
              help="Run the test and the application it starts at this lower CPU "
              "priority, so that the replica server keeps up while it runs.")
@click.option("--cleanup", is_flag=True,
              help="Test nothing: remove what a killed test of STORE left (its clone's "
              "mount and mount process, the clone, the mount directory).")
@click.option("--every", type=int, default=0, hidden=True,
              help="Seconds between scheduled tests (replica serve --test-every).")
@json_option
def test_cmd(store: Path, scenario_path: Path | None, variables: tuple[str, ...],
             at: str | None, primary: Path | None, keep_failed: bool, allow_other: bool,
             niceness: int, cleanup: bool, every: int, as_json: bool) -> None:
    """Prove replica STORE can be recovered from, while it keeps receiving: clone it at
    a moment, start and check the application on the clone (the scenario's [[test]]
    steps), then remove the clone. A pass bookmarks the point as tested-<time>.
    What a killed test left, the next test (or --cleanup) removes."""
    from cdpfs.scenario import Scenario

    from .drtest import check_replica, clean_up, run

    if cleanup:
        if scenario_path is not None:
            raise CdpfsError("--cleanup tests nothing: give it no --scenario")
        check_replica(store)
        found = clean_up(store, echo=click.echo)
        if found is None:
            click.echo(f"no DR test of {store} left anything behind")
        elif found.alive:
            click.echo(f"a DR test of {store} is running (pid {found.pid}): left alone")
        return
    if scenario_path is None:
        raise CdpfsError("give --scenario FILE (the steps that test the application), "
                         "or --cleanup")
    os.nice(niceness)  # inherited by the clone's mount daemon and the scenario's commands
    result = run(store, Scenario.load(scenario_path, variables), at=at, primary=primary,
                 keep_failed=keep_failed, allow_other=allow_other, every=every,
                 echo=(lambda line: click.echo(line, err=True)) if as_json else click.echo)
    if as_json:  # the result, whether it passed or not (exit status 1 if not)
        from cdpfs.api.documents import drtest_document

        echo_json({"format": 1, "store": str(store),
                   **(drtest_document(result, time.time_ns()) or {})})
        sys.exit(0 if result.ok else 1)
    click.echo(f"tree hash: {result.tree_hash}")
    if not result.ok:
        kept = f"; the clone is kept at {result.clone}" if result.clone else ""
        raise CdpfsError(f"DR test of {store} at #{result.seq} failed: {result.failed}{kept}")
    click.echo(f"DR test of {store} at #{result.seq} passed in {result.seconds:.1f}s; "
               f"bookmarked as {result.bookmark}")


@click.command("assess")
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.option("--since", default="1h", show_default=True,
              help="The period to assess, back from now (30m, 24h, 7d ...).")
@click.option("--lag", default="1s", show_default=True,
              help="The most a replica may fall behind, for the bandwidth figure.")
def assess_cmd(store: Path, since: str, lag: str) -> None:
    """Measure what replication would send, without sending anything."""
    from cdpfs.history.retention import parse_duration
    from cdpfs.replication.assess import assess

    try:
        period, max_lag = parse_duration(since), parse_duration(lag)
    except ValueError as exc:
        raise CdpfsError(str(exc)) from None
    result = assess(store, time.time_ns() - period * 10**9, max(1, max_lag))
    for line in result.lines():
        click.echo(line)


COMMANDS = [replica, replicate_cmd, assess_cmd]
