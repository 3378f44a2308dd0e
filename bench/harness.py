"""The process-level harness of the tests and the benchmarks: real CLI, real mounts,
real replica servers, a real TCP proxy.

``Volume`` is a store and its mount point driven through the ``cdpfs`` command;
``ReplicaServer`` a ``cdpfs replica serve`` child process; ``Proxy`` a TCP relay
that counts, records, damages or drops what crosses it. The benchmarks beside
it import it, and so do the tests (pytest puts bench/ on the path): one harness
for both. Every mount and
process made here is cleaned up by its ``cleanup``/``kill``/``close``, which the
tests' fixtures call in teardown, also when a test fails. In-process helpers
(no root, no FUSE) are in ``cdpfs.testing``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cdpfs.mount.control import find_mount, holder_pid

# The installed console script, beside the interpreter running the tests (not
# ``python -m``, which would put the checkout's cdpfs/ ahead of the installed package).
CLI = [str(Path(sys.executable).parent / "cdpfs")]
LOG_BAD = (" ERROR ", " CRITICAL ", "Traceback")  # log lines that mean something broke
RESUMING = re.compile(r"\) connected; resuming after #(\d+)")
_CAP_SYS_ADMIN, _CAP_NET_ADMIN = 21, 12
_FUSE_DEV = (10, 229)  # major, minor of /dev/fuse


class HarnessError(AssertionError):
    """A command or process of the harness failed (a test failure; the benchmarks
    report it as theirs)."""


def _capable(cap: int) -> bool:
    """Whether this process holds capability ``cap`` in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def privileged() -> bool:
    """Whether this process has root's powers over files (chown, mknod, chattr,
    bypassing permissions), not only uid 0."""
    return os.geteuid() == 0 and all(_capable(c) for c in (0, 1, 3, 9, 27))


def can_mount() -> bool:

    """Whether FUSE mounts can be made here: the real /dev/fuse and CAP_SYS_ADMIN."""
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        return False
    return (stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == _FUSE_DEV
            and _capable(_CAP_SYS_ADMIN))


def can_make_netns() -> bool:
    """Whether network namespaces can be made here (CAP_NET_ADMIN and ``ip``)."""
    return _capable(_CAP_NET_ADMIN) and _capable(_CAP_SYS_ADMIN) and any(
        os.access(Path(d) / "ip", os.X_OK) for d in os.environ.get("PATH", "").split(":"))


def cdpfs(*args: str | os.PathLike[str], check: bool = True, timeout: float = 300,
          **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real ``cdpfs`` command line (HarnessError if ``check`` and it fails)."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        said = "\n".join(s for s in (proc.stdout.strip(), proc.stderr.strip()) if s)
        raise HarnessError(f"cdpfs {' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{said}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Assert the command failed (exit 1) with exactly one ``cdpfs: error:`` line, the
    last it wrote (warnings such as a retry may come before it), no traceback, holding
    each of ``words``; return that line."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("cdpfs: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def live_names(root: Path) -> list[str]:
    """The names in a volume's root directory, without the @ entries of history."""
    return sorted(n for n in os.listdir(root) if not n.startswith("@"))


def settle(mnt: Path) -> None:
    """Make the mount commit everything it has applied (an fsync of its root)."""
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_seq(store: Path) -> int:
    """The newest committed record of a store (0 if it does not exist yet), read
    from outside the process writing it."""
    from cdpfs.errors import StoreError
    from cdpfs.store import journal
    from cdpfs.store.lmdb import Store

    if not (store / "data.mdb").exists():
        return 0
    try:
        st = Store(store, readonly=True)
    except StoreError:  # a replica store being created right now: nothing in it yet
        return 0
    with st, st.txn() as txn:
        return journal.last(st, txn)[0]


def last_seq(vol: Volume) -> int:
    """The newest journal sequence number of a mounted volume."""
    settle(vol.mnt)
    return store_seq(vol.store)


def pair_stores(upstream: Path, downstream: Path, down: str = "r1",
                up: str = "primary") -> None:
    """Give both stores a replication identity (if they lack one) and make each
    trust the other: ``downstream`` under the name ``down``, ``upstream`` as ``up``."""
    for store, name in ((upstream, up), (downstream, down)):
        if not (store / "tls" / "node.key").exists():
            cdpfs("replica", "keygen", store, "--name", name)
    cdpfs("replica", "trust", upstream, downstream / "tls" / "node.crt", "--name", down)
    cdpfs("replica", "trust", downstream, upstream / "tls" / "node.crt", "--name", up)


def wait_replicated(vol: Volume, replica: Path, timeout: float = 30) -> int:
    """Wait until ``replica`` holds everything ``vol``'s mount committed; that seq."""
    last = last_seq(vol)
    wait_until(lambda: store_seq(replica) >= last, timeout=timeout,
               what=f"the replica at #{last}")
    return last


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def wait_until(cond: Callable[[], object], timeout: float = 30.0,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out waiting for {what}")
        time.sleep(0.02)


_given: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound once to port 0, then released),
    never one this process was given before: two members of a cluster once got the
    same port, the second could not listen, and the cluster ran one member short."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> int | None:
    """Stop ``proc`` with ``sig``, then SIGKILL if it has not gone after ``timeout``;
    its exit status (None if it never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def log_problems(logfile: Path) -> list[str]:
    """The lines of a log that say something broke (errors, tracebacks)."""
    if not logfile.exists():
        return []
    return [line for line in logfile.read_text(errors="replace").splitlines()
            if any(bad in line for bad in LOG_BAD)]


class Procs:
    """Every ``cdpfs`` process a test starts in the background; all killed by
    ``kill_all`` (the fixture's teardown)."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str | os.PathLike[str]], log: Path) -> subprocess.Popen[bytes]:
        """``cdpfs ARGS`` with stdout and stderr appended to ``log``."""
        with open(log, "ab") as err:
            proc = subprocess.Popen([*CLI, *map(str, args)], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err)
        self.all.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


class ReplicaServer:
    """``cdpfs replica serve STORE --listen 127.0.0.1:PORT`` as a child process, its
    output collected in ``log`` across restarts; ``start()`` after ``kill()``
    restarts it on the same address. Stop or kill it in teardown.

    Attributes:
        store: the replica store (created by the first primary that connects).
        port, address: where it listens.
        log: its stdout and stderr.
    """

    def __init__(self, store: Path, log: Path | None = None, port: int | None = None,
                 procs: Procs | None = None) -> None:
        self.store = store
        self.log = log or store.parent / f"{store.name}.serve.log"
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs = procs or Procs()
        self.proc: subprocess.Popen[bytes] | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def resumed(self) -> list[int]:
        """The position of every accepted primary, in order (``resuming after #N``)."""
        return [int(n) for n in RESUMING.findall(self.text())]

    def start(self, *args: str, timeout: float = 30.0) -> ReplicaServer:
        """Start it (``args``: more options of ``replica serve``) and wait until it
        listens (it logs so: no probe connection)."""
        before = self.text().count(" listening on ")
        self.proc = self.procs.start(["replica", "serve", self.store, "--listen", self.address,
                                      *args], self.log)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(f"replica server exited ({self.proc.returncode}):\n"
                                   + self.text()[-3000:])
            return self.text().count(" listening on ") > before

        wait_until(listening, timeout=timeout, what="the replica server to listen")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL if it does not go); its exit status."""
        rc = stop_process(self.proc)
        self.proc = None
        return rc

    def problems(self) -> list[str]:
        return log_problems(self.log)


class Proxy:
    """A TCP relay from 127.0.0.1:``port`` to 127.0.0.1:``upstream``.

    ``up``/``down``: bytes from clients to the upstream and back; ``connections``:
    how many were relayed; ``recorded`` (with ``record``): what each client sent;
    ``arm(n)``: flip one byte of the client-to-upstream stream once, ``n`` bytes
    into a connection; ``drop()``: cut every open connection; ``paused``: cut every
    new connection at once (the link is down); ``live()``: connections still open.
    """

    def __init__(self, upstream: int, record: bool = False) -> None:
        self.upstream = upstream
        self.record = record
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.up = self.down = self.connections = 0
        self.flip_at: int | None = None
        self.flipped = 0
        self.paused = False
        self.recorded: list[bytearray] = []
        self._open: list[socket.socket] = []
        self._links: list[list[bool]] = []  # per connection: [still open]
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def total(self) -> int:
        with self.lock:
            return self.up + self.down

    def live(self) -> int:
        with self.lock:
            return sum(link[0] for link in self._links)

    def arm(self, n: int) -> None:
        with self.lock:
            self.flip_at = n

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.paused:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            record = bytearray() if self.record else None
            link = [True]
            with self.lock:
                self.connections += 1
                if record is not None:
                    self.recorded.append(record)
                self._open += [client, server]
                self._links.append(link)
            self._start(self._pump, client, server, link, True, record)
            self._start(self._pump, server, client, link, False, None)

    def _pump(self, src: socket.socket, dst: socket.socket, link: list[bool], up: bool,
              record: bytearray | None) -> None:
        count = 0
        try:
            while data := src.recv(1 << 16):
                if up:
                    if record is not None:
                        record += data
                    with self.lock:
                        if self.flip_at is not None and count + len(data) > self.flip_at:
                            damaged = bytearray(data)
                            damaged[self.flip_at - count] ^= 0x10
                            data = bytes(damaged)
                            self.flip_at = None
                            self.flipped += 1
                    count += len(data)
                dst.sendall(data)
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            link[0] = False
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        with self.lock:
            socks, self._open = self._open, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.drop()
        for t in self._threads:
            t.join(2)
        with self.lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()


def force_unmount(mnt: Path) -> None:
    """Unmount whatever is left on ``mnt`` (after a crash or a failed test)."""
    store = find_mount(mnt)
    if store is not None:
        pid = holder_pid(store)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if os.path.ismount(mnt) or find_mount(mnt) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                       capture_output=True)


class Volume:
    """A store and its mount point; ``mount()``/``umount()`` run the real CLI.

    Attributes:
        store: the store directory.
        mnt: the mount point.
    """

    def __init__(self, base: Path, name: str = "vol") -> None:
        self.store = base / f"{name}.store"
        self.mnt = base / f"{name}.mnt"
        self.mnt.mkdir(exist_ok=True)

    def init(self, *args: str) -> Volume:
        cdpfs("init", self.store, *args)
        return self

    def mount(self, *args: str) -> Volume:
        cdpfs("mount", self.store, self.mnt, *args)
        if not os.path.ismount(self.mnt):
            raise HarnessError(f"{self.mnt}: not mounted after cdpfs mount")
        return self

    def umount(self) -> None:
        cdpfs("umount", self.mnt)
        if os.path.ismount(self.mnt):
            raise HarnessError(f"{self.mnt}: still mounted after cdpfs umount")

    def remount(self) -> None:
        self.umount()
        self.mount()

    def sync(self) -> None:
        """Make the mount commit everything it has applied."""
        settle(self.mnt)

    def last_seq(self) -> int:
        """The newest committed journal seq (``sync`` first while mounted)."""
        return store_seq(self.store)

    @property
    def pid(self) -> int:
        pid = holder_pid(self.store)
        assert pid is not None, "no mount process holds the store"
        return pid

    def kill(self) -> None:
        """SIGKILL the mount process (a crash), then clear the dead mount."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), what="mount process to die")
        force_unmount(self.mnt)

    def verify(self) -> None:
        proc = cdpfs("verify", self.store, check=False)
        assert proc.returncode == 0, f"verify found problems:\n{proc.stdout}{proc.stderr}"

    def problems(self) -> list[str]:
        """What the mount's log says broke."""
        return log_problems(self.store / "cdpfs.log")

    def cleanup(self) -> None:
        """Last resort: leaves nothing mounted (kills the mount process if need be)."""
        force_unmount(self.mnt)

