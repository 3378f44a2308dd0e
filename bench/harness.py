"""Test helpers that build real instances: a store, a mounted volume.

Every mount made here is unmounted in teardown, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cdpfs.mount.control import find_mount, holder_pid

# The installed console script, beside the interpreter running the tests (not
# ``python -m``, which would put the checkout's cdpfs/ ahead of the installed package).
CLI = [str(Path(sys.executable).parent / "cdpfs")]


def cdpfs(*args: str | os.PathLike[str], check: bool = True, timeout: float = 300,
          **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real ``cdpfs`` command line."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"cdpfs {' '.join(map(str, args))} failed "
                             f"({proc.returncode}): {proc.stderr.strip()}")
    return proc


def live_names(root: Path) -> list[str]:
    """The names in a volume's root directory, without the @ entries of history."""
    return sorted(n for n in os.listdir(root) if not n.startswith("@"))


def settle(mnt: Path) -> None:
    """Make the mount commit everything it has applied (an fsync of its root)."""
    fd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_seq(vol: Volume) -> int:
    """The newest journal sequence number of a mounted volume, read through the library."""
    from cdpfs import journal
    from cdpfs.store import Store

    settle(vol.mnt)
    with Store(vol.store, readonly=True) as st, st.txn() as txn:
        return journal.last(txn, st.db)[0]


def pair_stores(upstream: Path, downstream: Path, down: str = "r1",
                up: str = "primary") -> None:
    """Give both stores a replication identity (if they lack one) and make each
    trust the other: ``downstream`` under the name ``down``, ``upstream`` as ``up``."""
    for store, name in ((upstream, up), (downstream, down)):
        if not (store / "tls" / "node.key").exists():
            cdpfs("replica", "keygen", store, "--name", name)
    cdpfs("replica", "trust", upstream, downstream / "tls" / "node.crt", "--name", down)
    cdpfs("replica", "trust", downstream, upstream / "tls" / "node.crt", "--name", up)


def store_seq(store: Path) -> int:
    """The newest committed record of a store (0 if it does not exist yet), read
    from outside the process writing it."""
    from cdpfs import journal
    from cdpfs.errors import StoreError
    from cdpfs.store import Store

    if not (store / "data.mdb").exists():
        return 0
    try:
        st = Store(store, readonly=True)
    except StoreError:  # a replica store being created right now: nothing in it yet
        return 0
    with st, st.txn() as txn:
        return journal.last(txn, st.db)[0]


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback TCP port nothing listens on (bound once to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReplicaServer:
    """``cdpfs replica serve STORE --listen 127.0.0.1:PORT`` as a child process, its
    stderr collected in ``log``; ``start()`` after ``kill()`` restarts it on the same
    address. Kill it in the test's teardown."""

    def __init__(self, store: Path, log: Path) -> None:
        self.store, self.log = store, log
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> ReplicaServer:
        before = self.text().count(" listening on ")
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([*CLI, "replica", "serve", str(self.store),
                                          "--listen", self.address], stderr=err)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"replica server exited ({self.proc.returncode}):\n"
                                     + self.text()[-3000:])
            return self.text().count(" listening on ") > before

        wait_until(listening, what="the replica server to listen")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


def force_unmount(mnt: Path) -> None:
    """Unmount whatever is left on ``mnt`` (after a crash or a failed test)."""
    store = find_mount(mnt)
    if store is not None:
        pid = holder_pid(store)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
        assert os.path.ismount(self.mnt)
        return self

    def umount(self) -> None:
        cdpfs("umount", self.mnt)
        assert not os.path.ismount(self.mnt)

    def remount(self) -> None:
        self.umount()
        self.mount()

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

    def cleanup(self) -> None:
        force_unmount(self.mnt)
