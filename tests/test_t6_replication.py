"""Replication through the real command line: a primary store ships to a replica server.

Every test runs real processes on loopback ports: ``cdpfs replica serve`` (a
replica server, logging to a file), ``cdpfs replicate`` (the shipper, once or
``--follow``), real FUSE mounts of the primary and read-only snapshot mounts of
the replica. Network faults are made by a small TCP proxy (threads and
sockets) that can flip a byte, record what the client sent, or drop every
connection. Every process started here is killed and every mount unmounted in
teardown, also when a test fails.

Covered: convergence of a volume with real content, incremental runs that send
only what is new (and no block the replica already has), live shipping with
``--follow``, SIGKILLs of either side in random rounds with resume from the
acknowledged position, a damaged link, refusals (untrusted certificates, a
replayed handshake, another volume) and bad command lines.

A mount ships to the replicas registered in its store by itself. Where a test
wants ``cdpfs replicate`` to be the only shipper, it writes with the link down
(``Pair.writing``) and ships from the unmounted store; the live tests (3 and 4)
run ``--follow`` beside the mount, which then ships too.
``CDPFS_REPL_ROUNDS`` sets the number of crash rounds (default 20).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    Procs,
    Proxy,
    ReplicaServer,
    Volume,
    cdpfs,
    force_unmount,
    free_port,
    last_seq,
    one_line_error,
    pair_stores,
    settle,
    stop_process,
    wait_until,
)

MIB = 1 << 20
ROUNDS = int(os.environ.get("CDPFS_REPL_ROUNDS", "20"))
SUMMARY = re.compile(r"replica (\S+) at #(\d+): (\d+) records \(from #(\d+)\), "
                     r"([\d.]+) MiB sent in ([\d.]+)s")
DROPPED = re.compile(r"refused TLS connection|connection dropped")
# what the replica must log when the bytes it got were damaged: the TLS failure itself
DAMAGED = re.compile(r"refused TLS connection|connection dropped: .*(SSL|TLS|damaged|MAC)", re.I)

Tree = dict[str, tuple[object, ...]]


# --- processes ----------------------------------------------------------------------------




class Shipper:
    """``cdpfs replicate STORE --follow ...`` in the background; stderr in ``log``."""

    def __init__(self, procs: Procs, store: Path, log: Path, *args: str) -> None:
        self.proc = procs.start(["replicate", store, "--follow", *args], log)
        self.log = log

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the --follow shipper exited ({self.proc.returncode}):\n"
                                 + self.log.read_text(errors="replace")[-3000:])

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc)


# --- credentials and runs -------------------------------------------------------------------


def keygen(store: Path, name: str) -> Path:
    cdpfs("replica", "keygen", store, "--name", name)
    cert = store / "tls" / "node.crt"
    assert cert.is_file() and (store / "tls" / "node.key").is_file()
    return cert


def trust(store: Path, peer_store: Path, name: str) -> None:
    cdpfs("replica", "trust", store, peer_store / "tls" / "node.crt", "--name", name)


@dataclass
class Summary:
    """The line ``cdpfs replicate`` prints when the replica has everything."""

    name: str
    at: int
    records: int
    start: int
    mib: float
    seconds: float


def replicate(store: Path, *args: str, timeout: float = 120) -> Summary:
    r = cdpfs("replicate", store, *args, timeout=timeout)
    m = SUMMARY.search(r.stdout)
    assert m, f"no summary line in {r.stdout!r}"
    return Summary(m[1], int(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6]))


def compare(primary: Path, replica: Path, at: int | None = None) -> str:
    args = ["--at", str(at)] if at is not None else []
    r = cdpfs("verify", "--compare", primary, replica, *args, check=False)
    assert r.returncode == 0, f"verify --compare: {r.stdout}{r.stderr}"
    assert re.fullmatch(r"identical at #\d+: \d+ entries, tree hash [0-9a-f]+\n", r.stdout), \
        r.stdout
    return r.stdout


def compared_at(out: str) -> int:
    m = re.match(r"identical at #(\d+)", out)
    assert m, out
    return int(m[1])


def verify_store(store: Path) -> None:
    r = cdpfs("verify", store, check=False)
    assert r.returncode == 0, f"verify {store} found problems:\n{r.stdout}{r.stderr}"


def store_last(store: Path) -> int:
    """The newest journal seq of a store, from ``cdpfs status``."""
    m = re.search(r"last #(\d+)", cdpfs("status", store).stdout)
    assert m
    return int(m[1])


def replica_line(store: Path, name: str) -> str:
    for line in cdpfs("status", store).stdout.splitlines():
        if line.startswith("replica ") and line.split()[1] == name:
            return line
    raise AssertionError(f"no replica {name} in cdpfs status {store}")


def acked(store: Path, name: str) -> int:
    """The position ``cdpfs status`` shows for replica ``name`` (0 while not registered)."""
    try:
        line = replica_line(store, name)
    except AssertionError:
        return 0
    m = re.search(r"acked #(\d+)", line)
    assert m, line
    return int(m[1])



# --- trees ----------------------------------------------------------------------------------


def tree_state(root: Path) -> Tree:
    """Everything a replica must reproduce under ``root`` (without the root's @ names):
    type, mode, owner, size, mtime, content hash or target, xattrs, hard-link groups."""
    out: Tree = {}
    inodes: dict[int, list[str]] = {}

    def attrs(path: Path, st: os.stat_result) -> tuple[object, ...]:
        base = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        if stat.S_ISLNK(st.st_mode):
            return base
        names = sorted(os.listxattr(path, follow_symlinks=False))
        return (*base, tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))

    def walk(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", st.st_nlink, *attrs(path, st))
            for name in sorted(os.listdir(path)):
                if rel == "." and name.startswith("@"):
                    continue
                walk(path / name, name if rel == "." else f"{rel}/{name}")
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(path), *attrs(path, st))
        elif stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("f", st.st_size, st.st_nlink, digest, *attrs(path, st))
            inodes.setdefault(st.st_ino, []).append(rel)
        else:
            out[rel] = ("other", stat.S_IFMT(st.st_mode), st.st_rdev, *attrs(path, st))

    walk(root, ".")
    for names in inodes.values():
        for rel in names:
            out[rel] = (*out[rel], tuple(sorted(names)))
    return out


def assert_same(got: Tree, want: Tree) -> None:
    diffs = [f"{k}:\n  got  {got.get(k)}\n  want {want.get(k)}"
             for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:20])


class SnapshotMount:
    """``cdpfs mount --at '#SEQ' STORE MNT`` for a ``with`` block; always unmounted."""

    def __init__(self, store: Path, seq: int, mnt: Path) -> None:
        self.store, self.seq, self.mnt = store, seq, mnt

    def __enter__(self) -> Path:
        self.mnt.mkdir(exist_ok=True)
        try:
            cdpfs("mount", "--at", f"#{self.seq}", self.store, self.mnt)
            assert os.path.ismount(self.mnt)
        except BaseException:
            force_unmount(self.mnt)
            raise
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        try:
            if os.path.ismount(self.mnt):
                cdpfs("umount", self.mnt)
        finally:
            force_unmount(self.mnt)


# --- writing to the primary -----------------------------------------------------------------


def fill(m: Path, rng: random.Random) -> None:
    """A few MB of real content: a 5 MiB random file, text, a sparse file, hard links,
    symlinks, a fifo, xattrs; then changes, renames and deletions."""
    (m / "big.bin").write_bytes(rng.randbytes(5 * MIB))
    docs = m / "docs"
    (docs / "sub" / "deep").mkdir(parents=True)
    for i in range(25):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", str(i)])
                         for _ in range(rng.randrange(10, 40_000)))
        (docs / f"t{i:02}.txt").write_text(words)
    (docs / "sub" / "deep" / "leaf").write_bytes(rng.randbytes(300_000))
    with open(m / "sparse", "wb") as f:
        f.seek(3 * MIB)
        f.write(b"tail of a sparse file")
    (m / "empty").touch()
    os.link(docs / "t00.txt", docs / "hard")
    os.link(docs / "t00.txt", m / "hard2")
    os.symlink("docs/t01.txt", m / "link")
    os.symlink("nowhere/at/all", m / "dangling")
    os.mkfifo(m / "fifo")
    os.setxattr(docs / "t02.txt", "user.color", b"blue")
    os.setxattr(docs / "t02.txt", "user.binary", bytes(range(256)))
    os.setxattr(docs, "user.dir", b"on a directory")
    os.chmod(docs / "t03.txt", 0o600)
    # changes after the fact
    with open(m / "big.bin", "r+b") as f:
        f.seek(1_000_000)
        f.write(rng.randbytes(4096))  # a small patch inside a block
        f.seek(0, os.SEEK_END)
        f.write(b"appended")
    with open(docs / "t04.txt", "a") as f:
        f.write(" appended words" * 100)
    os.truncate(docs / "t05.txt", 17)
    (docs / "t06.txt").unlink()
    os.rename(docs / "t07.txt", m / "moved.txt")
    os.rename(docs / "sub", docs / "renamed-sub")
    os.removexattr(docs / "t02.txt", "user.color")
    (docs / "t08.txt").write_text("replaced whole")
    (m / "gone").mkdir()
    (m / "gone" / "x").write_text("x")
    shutil.rmtree(m / "gone")


class Writer(threading.Thread):
    """Keeps changing files under ``root/w`` through the mount until ``finish()``."""

    def __init__(self, root: Path, seed: int, pause: float = 0.01,
                 sizes: tuple[int, ...] = (0, 100, 4096, 20_000, 131_072 + 17, 300_000)) -> None:
        super().__init__(daemon=True)
        self.dir = root / "w"
        self.rng = random.Random(seed)
        self.pause = pause
        self.sizes = sizes
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.ops = 0
        self.names: list[str] = []
        self.serial = 0

    def run(self) -> None:
        try:
            self.dir.mkdir(exist_ok=True)
            while not self.stop_flag.is_set():
                self.step()
                self.ops += 1
                time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc

    def data(self, n: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(n)
        return (b"compressible %d " % self.serial * (n // 10 + 1))[:n]

    def step(self) -> None:
        rng, d = self.rng, self.dir
        self.serial += 1
        r = rng.random()
        if r < 0.35 or len(self.names) < 5:
            name = f"f{self.serial}"
            (d / name).write_bytes(self.data(rng.choice(self.sizes)))
            self.names.append(name)
            return
        name = rng.choice(self.names)
        p = d / name
        if r < 0.55:
            with open(p, "ab") as f:
                f.write(self.data(rng.randrange(1, 20_000)))
        elif r < 0.70:
            size = p.stat().st_size
            fd = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(fd, self.data(rng.randrange(1, 8192)), rng.randrange(0, size + 1))
            finally:
                os.close(fd)
        elif r < 0.78:
            os.truncate(p, rng.randrange(0, p.stat().st_size + 1))
        elif r < 0.86:
            new = f"r{self.serial}"
            os.rename(p, d / new)
            self.names[self.names.index(name)] = new
        elif r < 0.93:
            p.unlink()
            self.names.remove(name)
        elif r < 0.96:
            os.setxattr(p, "user.n", b"%d" % self.serial)
        elif r < 0.98:
            new = f"h{self.serial}"
            os.link(p, d / new)
            self.names.append(new)
        else:
            os.symlink(name, d / f"s{self.serial}")

    def finish(self) -> None:
        self.stop_flag.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the writer did not stop"
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error


# --- a TCP proxy that damages, records or drops (harness.Proxy) -----------------------------


@pytest.fixture
def proxies() -> Iterator[Callable[[int], Proxy]]:
    made: list[Proxy] = []

    def make(upstream: int) -> Proxy:
        p = Proxy(upstream, record=True)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# --- a paired primary and replica -----------------------------------------------------------


@dataclass
class Pair:
    """A primary (the ``volume`` fixture), its replica store, the replica server and a
    proxy in front of it: every ``cdpfs replicate`` of a test goes through the proxy, so
    the replica is registered at the proxy's address."""

    vol: Volume
    replica: Path
    server: ReplicaServer
    proxy: Proxy
    procs: Procs
    tmp: Path

    @property
    def primary(self) -> Path:
        return self.vol.store

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """The primary mounted for changes, with the link to the replica down (a mount
        ships to registered replicas by itself: here only ``cdpfs replicate`` ships);
        unmounted after, so shipping reads an unmounted store."""
        self.proxy.paused = True
        try:
            if not os.path.ismount(self.vol.mnt):
                self.vol.mount()
            yield self.vol.mnt
            settle(self.vol.mnt)
            self.vol.umount()
        finally:
            self.proxy.paused = False

    def ship(self, *args: str, timeout: float = 120) -> Summary:
        return replicate(self.primary, "--to", self.proxy.address, "--name", "r1", *args,
                         timeout=timeout)

    def follow(self, log_name: str, *args: str) -> Shipper:
        return Shipper(self.procs, self.primary, self.tmp / log_name, "--to",
                       self.proxy.address, "--name", "r1", *args)


@pytest.fixture
def repl(volume: Volume, procs: Procs, proxies: Callable[[int], Proxy],
         tmp_path: Path) -> Iterator[Pair]:
    replica = tmp_path / "replica.store"
    pair_stores(volume.store, replica)
    server = ReplicaServer(procs=procs, store=replica).start()
    proxy = proxies(server.port)
    # Only the tests' own 'cdpfs replicate' runs ship to it, not the mount.
    cdpfs("replica", "add", volume.store, "r1", "--address", proxy.address, "--mode", "manual")
    try:
        yield Pair(volume, replica, server, proxy, procs, tmp_path)
    finally:
        procs.kill_all()


@contextmanager
def store_seq(store: Path) -> Iterator[Callable[[], int]]:
    """A fast reader of a store's newest seq (read-only, beside the process writing it;
    the store must exist)."""
    from cdpfs.store import journal
    from cdpfs.store.lmdb import Store

    st = Store(store, readonly=True)

    def last() -> int:
        with st.txn() as txn:
            return int(journal.last(st, txn)[0])

    try:
        yield last
    finally:
        st.close()


# --- 1. convergence -------------------------------------------------------------------------


def test_replica_converges_to_a_volume_with_real_content(repl: Pair, tmp_path: Path) -> None:
    with repl.writing() as m:
        fill(m, random.Random(1))
        live = {rel: (m / rel).read_bytes() for rel in (
            "big.bin", "docs/t04.txt", "docs/renamed-sub/deep/leaf", "sparse", "moved.txt",
            "hard2", "docs/t01.txt")}
    last = store_last(repl.primary)
    assert not (repl.replica / "data.mdb").exists()  # created by the first contact

    s = repl.ship()
    assert (s.name, s.at, s.records, s.start) == ("r1", last, last, 1), s
    assert 5 <= s.mib < 9, f"{s.mib} MiB sent for about 6 MiB of content, 5 of it random"
    assert compared_at(compare(repl.primary, repl.replica)) == last
    for seq in (1, last // 3, 2 * last // 3):  # the history is the same too
        assert compared_at(compare(repl.primary, repl.replica, seq)) == seq
    line = replica_line(repl.primary, "r1")
    assert f"({repl.proxy.address}, manual): not connected, acked #{last}, lag 0 records" \
        in line, line
    assert repl.server.resumed() == [0]
    verify_store(repl.replica)

    with SnapshotMount(repl.replica, last, tmp_path / "snap") as snap, \
            SnapshotMount(repl.primary, last, tmp_path / "psnap") as psnap:
        assert_same(tree_state(snap), tree_state(psnap))
        for rel, data in live.items():
            assert (snap / rel).read_bytes() == data, rel
        assert os.readlink(snap / "link") == "docs/t01.txt"
        assert (snap / "link").read_bytes() == live["docs/t01.txt"]
        assert os.getxattr(snap / "docs" / "t02.txt", "user.binary") == bytes(range(256))
        assert os.stat(snap / "hard2").st_ino == os.stat(snap / "docs" / "hard").st_ino
        assert os.stat(snap / "hard2").st_nlink == 3
        assert not (snap / "gone").exists() and not (snap / "docs" / "t06.txt").exists()


# --- 2. incremental runs --------------------------------------------------------------------


def test_incremental_runs_send_only_what_is_new(repl: Pair) -> None:
    rng = random.Random(2)
    with repl.writing() as m:
        (m / "big.bin").write_bytes(rng.randbytes(5 * MIB))
        (m / "small").mkdir()
        for i in range(10):
            (m / "small" / f"s{i}").write_bytes(rng.randbytes(2000))
    first = repl.ship()
    assert first.at == store_last(repl.primary) and first.mib >= 5, first

    problems: list[str] = []

    def sent_total() -> float:
        m = re.search(r"sent \d+ records ([\d.]+) MiB", replica_line(repl.primary, "r1"))
        assert m
        return float(m[1])

    def run(what: str, prev: Summary, max_mib: float) -> Summary:
        before = sent_total()
        last = store_last(repl.primary)
        s = replicate(repl.primary, "--name", "r1")  # registered by the first run
        if s.at != last:
            problems.append(f"{what}: replica at #{s.at}, primary at #{last}")
        if last > prev.at and s.start != prev.at + 1:
            problems.append(f"{what}: printed 'from #{s.start}', expected from #{prev.at + 1}")
        if s.records != last - prev.at:
            problems.append(f"{what}: printed {s.records} records, shipped "
                            f"#{prev.at + 1}..#{last} = {last - prev.at}")
        if s.mib > max_mib:
            problems.append(f"{what}: printed {s.mib} MiB sent, expected at most {max_mib}")
        grew = sent_total() - before
        if grew > max_mib + 0.05:
            problems.append(f"{what}: status 'sent' grew by {grew:.1f} MiB, expected at "
                            f"most {max_mib}")
        return s

    with repl.writing() as m:  # a few small files changed: a small run from where it was
        for i in range(5):
            (m / "small" / f"n{i}").write_bytes(rng.randbytes(3000))
        with open(m / "small" / "s0", "r+b") as f:
            f.write(b"changed")
    second = run("small changes", first, 0.1)
    third = run("nothing new", second, 0.05)
    with repl.writing() as m:  # the same 5 MiB under a new name: its blocks are there already
        subprocess.run(["cp", m / "big.bin", m / "copy.bin"], check=True)
        assert (m / "copy.bin").read_bytes() == (m / "big.bin").read_bytes()
    fourth = run("a copy of big.bin", third, 0.5)
    assert compared_at(compare(repl.primary, repl.replica)) == fourth.at
    verify_store(repl.replica)
    assert not problems, "incremental runs:\n" + "\n".join(problems)


# --- 3. live shipping -----------------------------------------------------------------------


def test_follow_ships_while_the_volume_is_written(repl: Pair, tmp_path: Path) -> None:
    """``replicate --follow`` beside a mount that is being written. (Once the replica is
    registered the mount ships to it too; both shippers must leave the replica right.)"""
    m = repl.vol.mnt
    writer = Writer(m, seed=3)
    shipper = repl.follow("follow.log", "--attempts", "0")
    try:
        writer.start()
        time.sleep(2.5)
        shipper.check_running()
        wait_until(lambda: acked(repl.primary, "r1") > 1, timeout=20,
                   what="the first acknowledgement")
        mid = acked(repl.primary, "r1")
        # the replica can be mounted at what it has while it keeps receiving
        with SnapshotMount(repl.replica, mid, tmp_path / "snap") as snap:
            assert_same(tree_state(snap), tree_state(m / f"@#{mid}"))
        time.sleep(2.5)
        writer.finish()
        assert writer.ops > 100, writer.ops
        last = last_seq(repl.vol)
        assert last > mid
        wait_until(lambda: f"acked #{last}, lag 0 records" in replica_line(repl.primary, "r1"),
                   timeout=60, what=f"the replica to acknowledge #{last}")
        shipper.check_running()
        shipper.stop()
    finally:
        writer.stop_flag.set()
        shipper.kill()
    assert compared_at(compare(repl.primary, repl.replica, last)) == last
    assert compared_at(compare(repl.primary, repl.replica)) == last
    verify_store(repl.replica)


# --- 4. crash and resume --------------------------------------------------------------------


def test_sigkill_of_either_side_resumes_where_the_replica_is(repl: Pair) -> None:
    rng = random.Random(20261125)
    m = repl.vol.mnt
    writer = Writer(m, seed=4, pause=0.02, sizes=(0, 100, 4096, 20_000, 131_072 + 17))
    n_logs = 0

    def start_shipper() -> Shipper:
        nonlocal n_logs
        n_logs += 1
        return repl.follow(f"ship{n_logs}.log", "--attempts", "0")

    shipper = start_shipper()
    kills = {"replica": 0, "shipper": 0, "both": 0}
    try:
        writer.start()
        wait_until(lambda: acked(repl.primary, "r1") > 1, timeout=30,
                   what="the first acknowledgement")
        for rnd in range(ROUNDS):
            time.sleep(rng.uniform(0.05, 0.4))
            shipper.check_running()
            assert repl.server.alive(), repl.server.text()[-3000:]
            what = rng.choice(list(kills))
            kills[what] += 1
            acked_before = acked(repl.primary, "r1")  # durable on the replica by now
            sessions = len(repl.server.resumed())  # (any later one starts at least there)
            if what in ("replica", "both"):
                repl.server.kill()
            if what in ("shipper", "both"):
                shipper.kill()
            time.sleep(rng.uniform(0, 0.3))
            if what in ("replica", "both"):
                repl.server.start()
            if what in ("shipper", "both"):
                shipper = start_shipper()
            wait_until(lambda n=sessions: len(repl.server.resumed()) > n, timeout=30,
                       what=f"round {rnd} ({what} killed): the shipper to reconnect")
            resumed = repl.server.resumed()[sessions]
            assert resumed >= acked_before, (
                f"round {rnd} ({what} killed): the replica resumed after #{resumed}, but "
                f"had acknowledged #{acked_before}")
        writer.finish()
        last = last_seq(repl.vol)
        shipper.check_running()
        wait_until(lambda: acked(repl.primary, "r1") >= last, timeout=60,
                   what=f"the follower to catch up with #{last}")
    finally:
        writer.stop_flag.set()
        shipper.kill()
    repl.vol.umount()
    # and once more without --follow: the replica has everything already
    s = replicate(repl.primary, "--name", "r1")
    assert (s.at, s.records) == (last, 0), s
    assert compared_at(compare(repl.primary, repl.replica)) == last
    for seq in sorted(random.Random(5).sample(range(1, last + 1), 5)):
        assert compared_at(compare(repl.primary, repl.replica, seq)) == seq
    verify_store(repl.replica)
    positions = repl.server.resumed()
    assert positions[0] == 0 and all(p > 0 for p in positions[1:]), \
        f"a restart resumed from #0 (a full resync): {positions}"
    assert positions == sorted(positions), f"the replica went back: {positions}"
    assert len(positions) >= ROUNDS + 2, (positions, kills)
    assert min(kills.values()) >= 2, kills


# --- 5. a damaged link ----------------------------------------------------------------------


def test_a_damaged_byte_on_the_link_is_never_applied(repl: Pair) -> None:
    rng = random.Random(6)
    unlogged: list[str] = []
    for rnd, n in enumerate((150, 1_500, 60_000, 2_000_000)):
        with repl.writing() as m:
            (m / f"round{rnd}.bin").write_bytes(rng.randbytes(3 * MIB))
            (m / f"round{rnd}.txt").write_text(f"round {rnd} " * 1000)
        last = store_last(repl.primary)
        log_at = len(repl.server.text())
        flipped = repl.proxy.flipped
        repl.proxy.arm(n)
        r = cdpfs("replicate", repl.primary, "--to", repl.proxy.address, "--name", "r1",
                  "--attempts", "4", check=False, timeout=90)
        assert r.returncode == 0, f"round {rnd} (byte {n} damaged): {r.stderr}"
        assert repl.proxy.flipped == flipped + 1, f"round {rnd}: the proxy flipped no byte"
        summary = SUMMARY.search(r.stdout)
        assert summary and int(summary[2]) == last, r.stdout
        assert "retrying" in r.stderr, r.stderr  # the shipper saw the failure
        if not DAMAGED.search(repl.server.text()[log_at:]):
            unlogged.append(f"round {rnd} (byte {n} damaged)")
        assert compared_at(compare(repl.primary, repl.replica)) == last
    verify_store(repl.replica)
    assert repl.server.alive()
    assert not unlogged, ("the replica's log does not say that the link was damaged (a TLS "
                          f"error) in {unlogged}:\n" + repl.server.text()[-4000:])


# --- 6. refusals ----------------------------------------------------------------------------


def test_an_untrusted_primary_is_refused(volume: Volume, procs: Procs, tmp_path: Path) -> None:
    primary, replica, stranger = volume.store, tmp_path / "replica.store", tmp_path / "x.store"
    pair_stores(primary, replica)
    cdpfs("init", stranger)
    keygen(stranger, "stranger")
    trust(stranger, replica, "r1")  # the stranger trusts the replica, not the other way
    (volume.mnt / "f").write_text("content")
    volume.umount()
    server = ReplicaServer(procs=procs, store=replica).start()

    def stranger_refused() -> None:
        refused = server.text().count("refused TLS connection")
        r = cdpfs("replicate", stranger, "--to", server.address, "--name", "r1",
                  "--attempts", "1", check=False, timeout=60)
        one_line_error(r)
        wait_until(lambda: server.text().count("refused TLS connection") > refused,
                   timeout=10, what="the replica to log the refused connection")

    stranger_refused()
    assert not (replica / "data.mdb").exists(), "an untrusted primary created the replica"
    last = store_last(primary)
    assert replicate(primary, "--to", server.address, "--name", "r1").at == last
    stranger_refused()
    assert store_last(replica) == last
    compare(primary, replica)
    assert server.alive()


def test_an_untrusted_replica_gets_nothing(volume: Volume, procs: Procs,
                                           tmp_path: Path) -> None:
    primary, trusted, other = volume.store, tmp_path / "r1.store", tmp_path / "r2.store"
    pair_stores(primary, trusted)
    keygen(other, "r2")
    trust(other, primary, "primary")  # it would accept the primary; the primary says no
    (volume.mnt / "f").write_text("secret")
    volume.umount()
    server = ReplicaServer(procs=procs, store=other).start()
    last = store_last(primary)
    # The primary ships to "r1" but finds r2's certificate at that address: refused.
    r = cdpfs("replicate", primary, "--to", server.address, "--name", "r1", "--attempts", "1",
              check=False, timeout=60)
    line = one_line_error(r)
    assert "certificate" in line.lower(), line
    assert not (other / "data.mdb").exists(), "the untrusted replica was created"
    wait_until(lambda: "refused TLS connection" in server.text(), timeout=10,
               what="the replica to log the refused connection")
    assert store_last(primary) == last


def test_a_replayed_handshake_is_refused(volume: Volume, procs: Procs, tmp_path: Path,
                                         proxies: Callable[[int], Proxy]) -> None:
    primary, replica = volume.store, tmp_path / "replica.store"
    pair_stores(primary, replica)
    (volume.mnt / "f").write_text("first")
    volume.umount()
    server = ReplicaServer(procs=procs, store=replica).start()
    proxy = proxies(server.port)
    first = replicate(primary, "--to", proxy.address, "--name", "r1")
    assert len(proxy.recorded) == 1 and len(proxy.recorded[0]) > 500, proxy.recorded
    recorded = bytes(proxy.recorded[0])
    # a twin of the replica with the same identity and trust, but no data yet
    twin = tmp_path / "twin.store"
    twin.mkdir()
    shutil.copytree(replica / "tls", twin / "tls")
    twin_server = ReplicaServer(procs=procs, store=twin).start()

    def replay(srv: ReplicaServer) -> None:
        before = len(DROPPED.findall(srv.text()))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(recorded)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
        wait_until(lambda: len(DROPPED.findall(srv.text())) > before, timeout=10,
                   what="the replica to log the refused replay")

    replay(twin_server)
    assert not (twin / "data.mdb").exists(), "a replayed session created a replica"
    assert "resuming after" not in twin_server.text(), twin_server.text()
    replay(server)
    assert store_last(replica) == first.at
    assert server.resumed() == [0], server.text()
    # the real primary still gets through
    assert replicate(primary, "--to", server.address, "--name", "r1").at == first.at
    assert server.alive() and twin_server.alive()


def test_a_replica_of_another_volume_refuses(volume: Volume, procs: Procs, tmp_path: Path,
                                             proxies: Callable[[int], Proxy]) -> None:
    primary, replica, other = volume.store, tmp_path / "replica.store", tmp_path / "o.store"
    cdpfs("init", other)
    pair_stores(primary, replica)
    keygen(other, "other")
    trust(other, replica, "r1")
    trust(replica, other, "other")
    (volume.mnt / "f").write_text("content")
    volume.umount()
    server = ReplicaServer(procs=procs, store=replica).start()
    last = replicate(primary, "--to", server.address, "--name", "r1").at
    # the primary stays connected (through a proxy, which sees whether the link is cut)
    proxy = proxies(server.port)
    follower = Shipper(procs, primary, tmp_path / "follow.log", "--to", proxy.address,
                       "--name", "r1", "--attempts", "0")
    try:
        wait_until(lambda: len(server.resumed()) == 2 and proxy.live() == 1, timeout=20,
                   what="the primary's session")
        r = cdpfs("replicate", other, "--to", server.address, "--name", "r1", check=False,
                  timeout=60)
        line = one_line_error(r)
        assert "volume" in line, line
        assert "refused: this replica holds volume" in server.text(), server.text()
        assert store_last(replica) == last
        compare(primary, replica)
        assert server.alive()
        follower.check_running()
        time.sleep(0.3)
        assert proxy.live() == 1, ("the refused primary of another volume cut the session "
                                   "of the replica's own primary:\n" + server.text())
    finally:
        follower.kill()


def test_attempts_count_failures_in_a_row(repl: Pair) -> None:
    """``--attempts 2`` gives up after two failed connections in a row, not after two
    drops each followed by a session that made progress."""
    with repl.writing() as m:
        (m / "f").touch()
        # one record each: batches of 2,000, several in each group commit on the replica
        for i in range(20000):
            os.utime(m / "f", ns=(i, i))
    last = store_last(repl.primary)
    proc = repl.procs.start(["replicate", repl.primary, "--to", repl.proxy.address,
                             "--name", "r1", "--attempts", "2"], repl.tmp / "ship.log")
    wait_until(lambda: repl.server.resumed() != [] or proc.poll() is not None, timeout=30,
               what="the first session")
    drops: list[int] = []
    with store_seq(repl.replica) as position:
        seen = 0
        while proc.poll() is None:
            now = position()
            if seen < now < last and len(drops) < 3:
                repl.proxy.drop()
                drops.append(now)
                seen = now
            time.sleep(0.005)
    out = (repl.tmp / "ship.log").read_text(errors="replace")
    assert len(drops) >= 2, f"the run needed too few batches to test this: {drops}\n{out}"
    assert proc.returncode == 0, f"gave up after drops at {drops} (each after progress):\n{out}"
    assert store_last(repl.replica) == last


# --- 7. bad input ---------------------------------------------------------------------------


def test_bad_addresses_are_one_line_errors(tmp_path: Path) -> None:
    primary, replica = tmp_path / "p.store", tmp_path / "r.store"
    cdpfs("init", primary)
    pair_stores(primary, replica)
    for addr in ("nonsense", "127.0.0.1", ":80", "127.0.0.1:http"):
        line = one_line_error(cdpfs("replicate", primary, "--to", addr, check=False))
        assert "HOST:PORT" in line, line
        line = one_line_error(cdpfs("replica", "serve", replica, "--listen", addr,
                                    check=False, timeout=20))
        assert "HOST:PORT" in line, line
    one_line_error(cdpfs("replicate", primary, check=False))  # neither --to nor --name
    line = one_line_error(cdpfs("replicate", primary, "--name", "unknown", check=False))
    assert "--to" in line, line
    nokey = tmp_path / "nokey.store"
    nokey.mkdir()
    line = one_line_error(cdpfs("replica", "serve", nokey, "--listen", "127.0.0.1:1",
                                check=False, timeout=20))
    assert "keygen" in line, line

    port = free_port()
    started = time.monotonic()
    r = cdpfs("replicate", primary, "--to", f"127.0.0.1:{port}", "--attempts", "2",
              check=False, timeout=60)
    line = one_line_error(r)
    assert "refused" in line.lower(), line
    assert time.monotonic() - started < 10
    assert not (replica / "data.mdb").exists()


def test_a_port_out_of_range_is_refused(tmp_path: Path) -> None:
    primary, replica = tmp_path / "p.store", tmp_path / "r.store"
    cdpfs("init", primary)
    pair_stores(primary, replica)
    r = cdpfs("replicate", primary, "--to", "127.0.0.1:99999", "--attempts", "1", check=False)
    line = one_line_error(r)
    assert "99999" in line and "retrying" not in r.stderr and "Errno" not in line, \
        f"tried to connect somewhere instead of refusing port 99999:\n{r.stderr}"
    try:
        r = cdpfs("replica", "serve", replica, "--listen", "127.0.0.1:99999", check=False,
                  timeout=10)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"'replica serve --listen 127.0.0.1:99999' kept running "
                             f"(on port {99999 % 65536}?) instead of refusing:\n"
                             f"{exc.stderr!r}") from None
    one_line_error(r)


def test_a_failed_first_contact_registers_no_replica(tmp_path: Path) -> None:
    """A mistyped address that never answered leaves no replica behind (a registered
    replica that never acknowledges anything would keep prune from removing history)."""
    primary, replica = tmp_path / "p.store", tmp_path / "r.store"
    cdpfs("init", primary)
    pair_stores(primary, replica)
    port = free_port()
    one_line_error(cdpfs("replicate", primary, "--to", f"127.0.0.1:{port}", "--attempts",
                         "1", check=False))
    one_line_error(cdpfs("replicate", primary, "--to", f"127.0.0.1:{port}", "--name", "typo",
                         "--attempts", "1", check=False))
    status = cdpfs("status", primary).stdout
    assert not [ln for ln in status.splitlines() if ln.startswith("replica ")], status
