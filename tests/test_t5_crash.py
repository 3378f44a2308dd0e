"""Crash safety: SIGKILL the mount daemon in the middle of a write workload, many times.

Each iteration mounts the volume, starts a writer subprocess (this file run as
a script) that creates new files and appends to, overwrites and truncates
older ones, fsyncing most of them, and SIGKILLs the mount daemon at a random
moment (or right after the n-th fsync returned). The writer keeps an intent
log on local disk: a line before every write or truncate (with the seed its
data is made from) and, only after ``fsync`` returned, a line with the file's
size and sha256. After the crash the store must verify clean, mount again,
and then:

* every file whose last change was followed by a completed fsync is byte-exact;
* a file with changes in flight holds, at every byte, a value that byte had at
  some moment since its last fsync (old or new data, never garbage) and a size
  between the smallest and largest it had; a file never fsynced may be absent;
* no other names exist.

What is found becomes the starting state of the next iteration, so files
accumulate across iterations and older fsynced files keep being changed.
``CDPFS_CRASH_ITERS`` sets the number of iterations (default 24).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HAVE_FUSE
from harness import Volume, cdpfs, live_names, wait_until

KIB = 1 << 10
MIB = 1 << 20
PAGE = 4096


def make_data(seed: int, n: int) -> bytes:
    """The bytes of one write, reproducible from its seed (some compressible)."""
    rng = random.Random(seed)
    if seed % 3 == 0:
        unit = rng.randbytes(rng.choice((1, 13, 4096)))
        return (unit * (n // len(unit) + 1))[:n]
    return rng.randbytes(n)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the writer (runs in a subprocess) ---------------------------------------------


def writer_main(mnt: Path, log_path: Path, state_path: Path, iteration: int, seed: int) -> None:
    """Write forever (until killed); log intents before and fsyncs after they happen."""
    rng = random.Random(seed)
    state: dict[str, str] = json.loads(state_path.read_text())
    logfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(**rec: object) -> None:
        os.write(logfd, (json.dumps(rec) + "\n").encode())  # one write: a whole line or none

    contents: dict[str, bytearray] = {}
    names = sorted(state)
    # Everything is opened relative to the mounted root, never by path: once the
    # dead mount is detached, a path would lead into the bare directory beneath.
    root = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)

    def load(name: str) -> bytearray:
        if name not in contents:
            fd = os.open(name, os.O_RDONLY, dir_fd=root)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            if sha(data) != state[name]:
                sys.stderr.write(f"writer: {name} reads back with sha {sha(data)}, "
                                 f"expected {state[name]} (size {len(data)})\n")
                os._exit(3)
            contents[name] = bytearray(data)
        return contents[name]

    def write(name: str, fd: int, off: int, n: int) -> None:
        dseed = rng.getrandbits(62)
        log(op="write", name=name, off=off, len=n, seed=dseed)
        data = make_data(dseed, n)
        assert os.pwrite(fd, data, off) == n
        buf = contents[name]
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off : off + n] = data

    def truncate(name: str, fd: int, size: int) -> None:
        log(op="truncate", name=name, size=size)
        os.ftruncate(fd, size)
        buf = contents[name]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    def finish(name: str, fd: int) -> None:
        if rng.random() < 0.75:
            os.fsync(fd)
            buf = contents[name]
            log(op="fsync", name=name, size=len(buf), sha=sha(buf))
        os.close(fd)

    def new_size() -> int:
        r = rng.random()
        if r < 0.6:
            return rng.randint(0, 64 * KIB)
        if r < 0.95:
            return rng.randint(64 * KIB, MIB)
        return rng.randint(MIB, 4 * MIB)

    log(op="start")
    k = 0
    while True:
        r = rng.random()
        if r < 0.4 or not names:
            name = f"f{iteration:02d}_{k:03d}"
            k += 1
            log(op="create", name=name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=root)
            contents[name] = bytearray()
            names.append(name)
            size, pos = new_size(), 0
            while pos < size:
                n = min(size - pos, rng.randint(1, 256 * KIB))
                write(name, fd, pos, n)
                pos += n
            finish(name, fd)
        elif r < 0.9:
            name = rng.choice(names)
            buf = load(name)
            fd = os.open(name, os.O_WRONLY, dir_fd=root)
            for _ in range(rng.randint(1, 3)):
                kind = rng.random()
                if kind < 0.45:
                    write(name, fd, len(buf), rng.randint(1, 300 * KIB))  # append
                elif kind < 0.85:
                    off = rng.randint(0, len(buf))
                    write(name, fd, off, rng.randint(1, 200 * KIB))  # overwrite (maybe extend)
                else:
                    truncate(name, fd, rng.randint(0, len(buf) + 100 * KIB))
            finish(name, fd)
        else:
            time.sleep(rng.random() * 0.05)  # let a timed group commit happen


# --- the test ------------------------------------------------------------------------

ITERATIONS = int(os.environ.get("CDPFS_CRASH_ITERS", "24"))
BENCH = Path(__file__).resolve().parent.parent / "bench"  # where the harness is


State = list[bytes | None]  # a file's possible contents since its last fsync (None: absent)


def read_log(path: Path) -> list[dict[str, object]]:
    """The writer's complete log lines (a line cut short by the kill is dropped)."""
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        out.append(json.loads(line))
    return out


def replay(model: dict[str, bytes], records: list[dict[str, object]],
           ) -> dict[str, State]:
    """For every file: the contents it may now have (one entry if nothing is in flight)."""
    states: dict[str, State] = {name: [data] for name, data in model.items()}
    current: dict[str, bytearray] = {}
    for rec in records:
        op = rec["op"]
        if op == "start":
            continue
        name = str(rec["name"])
        if op == "create":
            assert name not in states, f"writer created {name} twice"
            states[name] = [None, b""]
            current[name] = bytearray()
            continue
        if name not in current:
            data = states[name][-1]
            assert data is not None
            current[name] = bytearray(data)
        buf = current[name]
        if op == "write":
            off, n = int(rec["off"]), int(rec["len"])  # type: ignore[call-overload]
            if off > len(buf):
                buf.extend(bytes(off - len(buf)))
            buf[off : off + n] = make_data(int(rec["seed"]), n)  # type: ignore[call-overload]
            states[name].append(bytes(buf))
        elif op == "truncate":
            size = int(rec["size"])  # type: ignore[call-overload]
            if size < len(buf):
                del buf[size:]
            else:
                buf.extend(bytes(size - len(buf)))
            states[name].append(bytes(buf))
        elif op == "fsync":
            assert sha(buf) == rec["sha"] and len(buf) == rec["size"], \
                f"the test's replay of {name} disagrees with the writer"
            states[name] = [bytes(buf)]
        else:
            raise AssertionError(f"unknown log record {rec}")
    return states


def plausible(actual: bytes, states: State) -> str | None:
    """Why ``actual`` cannot result from a crash amid ``states`` (None if it can)."""
    known = [s for s in states if s is not None]
    lo, hi = min(map(len, known)), max(map(len, known))
    if not lo <= len(actual) <= hi:
        return f"size {len(actual)} outside [{lo}, {hi}]"
    for p in range(0, len(actual), PAGE):
        page = actual[p : p + PAGE]
        n = len(page)
        cands = [s[p : p + n].ljust(n, b"\0") for s in known]
        if page in cands:
            continue
        for i in range(n):
            if all(c[i] != page[i] for c in cands):
                return (f"byte {p + i} is {page[i]:#04x}, which it never was "
                        f"(candidates {sorted({c[i] for c in cands})})")
    return None


def check_after_crash(mnt: Path, states: dict[str, State]) -> dict[str, bytes]:
    """Check every file against what it may hold; return what each one holds."""
    found = set(live_names(mnt))
    unexpected = found - set(states)
    assert not unexpected, f"names that were never created: {sorted(unexpected)}"
    problems = []
    model: dict[str, bytes] = {}
    for name, st in sorted(states.items()):
        if name not in found:
            if None not in st:
                problems.append(f"{name}: missing, but it was fsynced")
            continue
        actual = (mnt / name).read_bytes()
        if len(st) == 1:
            want = st[0]
            assert want is not None
            if actual != want:
                problems.append(f"{name}: fsynced content lost: size {len(actual)} sha "
                                f"{sha(actual)}, want size {len(want)} sha {sha(want)}")
        else:
            why = plausible(actual, st)
            if why:
                problems.append(f"{name} (changes in flight, {len(st)} states): {why}")
        model[name] = actual
    assert not problems, "after the crash:\n" + "\n".join(problems)
    return model


def mounted(mnt: Path) -> bool:
    """Whether anything is mounted on ``mnt`` (from /proc/mounts: no stat of a dead mount)."""
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_daemon(vol: Volume) -> None:
    """SIGKILL the mount daemon (the crash) and wait until it is gone.

    The dead mount stays attached (every access fails with ENOTCONN) until
    ``detach``; the writer must be dead by then, or its next open would land
    in the bare mount point directory underneath.
    """
    pid = vol.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), what="the mount process to die")


def detach(mnt: Path) -> None:
    if mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


_HOLDING_WRITER = """
import os, sys
mnt = sys.argv[1]
for i in range(10):
    with open(os.path.join(mnt, f"closed{i}"), "wb") as f:
        f.write(b"closed %d " % i * 1000)
held = os.open(os.path.join(mnt, "still-open"), os.O_WRONLY | os.O_CREAT, 0o644)
os.write(held, b"written, never flushed or closed " * 3000)  # unbuffered: in the page cache
print("ready", flush=True)
sys.stdin.read()  # holds the file open, its pages in the kernel's cache, until killed
"""


def test_cdpfs_sync_makes_everything_written_durable(volume: Volume) -> None:
    """sync(1) does not make a FUSE mount commit (the kernel sends a /dev/fuse mount
    no FUSE_SYNCFS): ``cdpfs sync`` writes the kernel's cache in and commits. Ten
    files written and closed, and one still open with its data only in the kernel's
    page cache, are all there after a SIGKILL of the mount right after it returns."""
    writer = subprocess.Popen([sys.executable, "-c", _HOLDING_WRITER, str(volume.mnt)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        cdpfs("sync", volume.mnt)
        kill_daemon(volume)
    finally:
        writer.kill()
        writer.wait()
    detach(volume.mnt)
    volume.mount()
    for i in range(10):
        assert (volume.mnt / f"closed{i}").read_bytes() == b"closed %d " % i * 1000
    assert (volume.mnt / "still-open").read_bytes() == b"written, never flushed or closed " * 3000


@pytest.mark.slow
def test_sigkill_during_writes_keeps_fsynced_data(volume: Volume, tmp_path: Path) -> None:
    crash_loop(volume, tmp_path, ITERATIONS, {})


@pytest.mark.slow
def test_sigkill_of_a_clone_mount_keeps_fsynced_clone_writes(tmp_path: Path) -> None:
    """A clone of a live volume, mounted beside it, killed 10 times while it writes
    over its base's files and its own: no fsynced clone write is lost, and the base
    never changes."""
    if not HAVE_FUSE:
        pytest.skip("needs /dev/fuse and CAP_SYS_ADMIN")
    base = Volume(tmp_path, "base").init()
    clone = Volume(tmp_path, "clone")
    try:
        base.mount()
        model = {f"base{i}": make_data(i, (i + 1) * 70_000) for i in range(4)}
        for name, data in model.items():
            (base.mnt / name).write_bytes(data)
        base.sync()
        cdpfs("clone", base.store, clone.store)
        clone.mount()
        crash_loop(clone, tmp_path, 10, model)
        assert {name: (base.mnt / name).read_bytes() for name in model} == model
        assert sorted(live_names(base.mnt)) == sorted(model)
        clone.umount()
        base.umount()
    finally:
        for vol in (clone, base):
            if not holder_alive(vol):
                detach(vol.mnt)
            vol.cleanup()


def crash_loop(volume: Volume, tmp_path: Path, iterations: int,
               model: dict[str, bytes]) -> None:
    """Mount, write, SIGKILL and check ``volume`` ``iterations`` times; ``model`` is what
    it holds at the start (regular files in its root)."""
    seed = int(os.environ.get("CDPFS_CRASH_SEED", random.SystemRandom().randrange(2**32)))
    print(f"crash test seed {seed} (replay with CDPFS_CRASH_SEED={seed})")
    rng = random.Random(seed)
    fsyncs_total = in_flight_total = 0
    try:
        for it in range(iterations):
            log_path = tmp_path / f"intent{it:02d}.log"
            state_path = tmp_path / f"state{it:02d}.json"
            state_path.write_text(json.dumps({n: sha(d) for n, d in model.items()}))
            if not mounted(volume.mnt):
                volume.mount()
            how = run_and_crash(volume, rng, it, log_path, state_path)
            where = f"iteration {it} (seed {seed}, killed {how})"
            assert not mounted(volume.mnt)
            leaked = os.listdir(volume.mnt)
            assert not leaked, f"{where}: files written past the dead mount: {leaked}"
            records = read_log(log_path)
            fsyncs = sum(1 for r in records if r["op"] == "fsync")
            r = cdpfs("verify", volume.store, check=False)
            assert r.returncode == 0, \
                f"{where}: the store does not verify after the crash:\n{r.stdout}{r.stderr}"
            volume.mount()
            states = replay(model, records)
            in_flight = sum(1 for st in states.values() if len(st) > 1)
            try:
                model = check_after_crash(volume.mnt, states)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            fsyncs_total += fsyncs
            in_flight_total += in_flight
            print(f"iteration {it}: killed {how}, {len(records)} log records, {fsyncs} fsyncs, "
                  f"{in_flight} files with changes in flight")
    finally:
        if not holder_alive(volume):  # a live mount is the fixture's to unmount
            detach(volume.mnt)
    assert fsyncs_total > iterations, "too few fsyncs completed to test anything"
    print(f"{iterations} crashes, {fsyncs_total} fsyncs and {in_flight_total} files in flight "
          f"checked; {len(model)} files, {sum(map(len, model.values())) >> 20} MiB")


def holder_alive(vol: Volume) -> bool:
    try:
        return alive(vol.pid)
    except AssertionError:
        return False


def run_and_crash(volume: Volume, rng: random.Random, it: int, log_path: Path,
                  state_path: Path) -> str:
    """Start the writer, SIGKILL the mount daemon mid-workload, then the writer; detach."""
    # This file is the writer too; as a script it finds the harness as pytest does.
    path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, __file__, str(volume.mnt), str(log_path), str(state_path),
         str(it), str(rng.getrandbits(62))], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": path})
    try:
        wait_until(lambda: (log_path.exists() and log_path.stat().st_size > 0)
                   or proc.poll() is not None, what="the writer to start")

        if it % 2:  # right after the n-th fsync returned
            n = rng.randint(1, 6)
            deadline = time.monotonic() + 10
            while (log_path.read_bytes().count(b'"fsync"') < n
                   and time.monotonic() < deadline and proc.poll() is None):
                time.sleep(0.001)
            how = f"after fsync #{n}"
        else:
            delay = rng.uniform(0.05, 2.5)
            time.sleep(delay)
            how = f"after {delay:.2f}s"
        assert proc.poll() is None, \
            f"iteration {it}: the writer failed before the crash:\n{proc.communicate()[1]}"
        kill_daemon(volume)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if not holder_alive(volume):
            detach(volume.mnt)
    return how


if __name__ == "__main__":
    writer_main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                int(sys.argv[5]))
    sys.exit(0)
