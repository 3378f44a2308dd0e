"""An fsx-style random-operation exerciser: real file operations checked against a model.

``FileExerciser`` drives one file on a mounted volume through a seeded random
mix of operations and mirrors each one in a ``bytearray`` model: buffered and
O_DIRECT writes and reads (O_DIRECT goes straight to the daemon, buffered I/O
through the kernel's writeback cache), zero writes ("punched holes"),
truncate/ftruncate down and up, mmap reads, MAP_SHARED writes with msync,
posix_fallocate, fsync/fdatasync, dropping the page cache (so reads hit the daemon), close and
reopen, size checks and rare sparse excursions far past 4 GiB. Every read is
compared with the model; a mismatch raises ``AssertionError`` naming the seed,
the operation number and the last operations, so a run can be replayed.
"""

from __future__ import annotations

import bisect
import mmap
import os
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path

BLOCK = 128 * 1024
PAGE = mmap.PAGESIZE
GIB = 1 << 30
KIB = 1 << 10


def first_difference(got: bytes, want: bytes | bytearray) -> str:
    """A short description of where two byte strings first differ."""
    n = min(len(got), len(want))
    lo, hi = 0, n
    while hi - lo > 64:  # binary search on equal prefixes: cheap on large buffers
        mid = (lo + hi) // 2
        if got[lo:mid] == want[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, n):
        if got[i] != want[i]:
            return (f"first difference at +{i}: got {got[i:i + 16].hex()} "
                    f"want {bytes(want[i:i + 16]).hex()} (lengths {len(got)} / {len(want)})")
    return f"lengths differ: got {len(got)} want {len(want)}"


class FileExerciser:
    """One file under test and its model.

    Attributes:
        path: the file on the mount.
        rng: the shared random generator (seeded by the caller).
        seed: the seed, for failure messages.
        max_size: the model never grows past this many bytes.
        model: the expected content.
        ops: operations done so far.
        history: descriptions of the last operations (for failure messages).
        counts: how many times each operation ran.
    """

    def __init__(self, path: Path, rng: random.Random, seed: int, *,
                 max_size: int = 4 << 20, far_every: int = 5000,
                 history: deque[str] | None = None) -> None:
        self.path = path
        self.rng = rng
        self.seed = seed
        self.max_size = max_size
        self.far_every = far_every
        self.model = bytearray()
        self.ops = 0
        self.history: deque[str] = history if history is not None else deque(maxlen=40)
        self.counts: dict[str, int] = {}
        self.fd = -1
        self.dfd = -1
        self.open(create=True)
        table: list[tuple[Callable[[], None], int]] = [
            (self.op_write, 24), (self.op_direct_write, 7), (self.op_read, 22),
            (self.op_direct_read, 6), (self.op_zero, 6), (self.op_truncate, 3),
            (self.op_ftruncate, 3), (self.op_mmap_read, 3), (self.op_mmap_write, 3),
            (self.op_fsync, 2), (self.op_drop_cache, 2), (self.op_reopen, 2),
            (self.op_stat, 3), (self.op_fallocate, 1),
        ]
        self._ops = [fn for fn, _ in table]
        self._weights = [w for _, w in table]
        self._cum: list[int] = []
        total = 0
        for w in self._weights:
            total += w
            self._cum.append(total)

    # --- plumbing -----------------------------------------------------------------

    def open(self, create: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(self.path, flags, 0o644)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT)

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1

    def note(self, text: str) -> None:
        self.history.append(f"#{self.ops} {self.path.name}: {text}")

    def fail(self, what: str) -> None:
        last = "\n  ".join(self.history)
        raise AssertionError(
            f"fsx seed {self.seed}: {self.path.name} after {self.ops} operations: {what}\n"
            f"(replay with CDPFS_FSX_SEED={self.seed}); last operations:\n  {last}")

    def expect(self, got: bytes, off: int, what: str) -> None:
        want = self.model[off : off + len(got)]
        if len(got) != len(want) or got != want:
            self.fail(f"{what} at {off}+{len(got)}: {first_difference(got, want)}")

    def _data(self, n: int) -> bytes:
        kind = self.rng.random()
        if kind < 0.6:
            return self.rng.randbytes(n)
        unit = self.rng.randbytes(self.rng.choice((1, 7, 64, 4096)))  # compressible
        return (unit * (n // len(unit) + 1))[:n]

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.randint(1, 600)
        if r < 0.85:
            return self.rng.randint(601, 64 * KIB)
        if r < 0.98:
            return self.rng.randint(64 * KIB, 300 * KIB)
        return self.rng.randint(300 * KIB, 1 << 20)

    def _offset(self, n: int) -> int:
        size = len(self.model)
        r = self.rng.random()
        if r < 0.35:
            off = self.rng.randint(0, size)
        elif r < 0.55:  # straddle a 128 KiB block boundary
            off = self.rng.randrange(0, self.max_size // BLOCK + 1) * BLOCK
            off += self.rng.randint(-min(n, 4096), 64)
        elif r < 0.70:
            off = size
        elif r < 0.85:  # past EOF: leaves a hole
            off = size + self.rng.randint(1, 512 * KIB)
        else:
            off = self.rng.randrange(0, self.max_size)
        return max(0, min(off, self.max_size - n))

    def _range(self) -> tuple[int, int]:
        """A read range: mostly inside the file, sometimes across or past EOF."""
        size = len(self.model)
        n = self._length()
        r = self.rng.random()
        if r < 0.7 or size == 0:
            off = self.rng.randint(0, size)
        elif r < 0.85:
            off = max(0, self.rng.randrange(0, size // BLOCK + 1) * BLOCK
                      - self.rng.randint(0, 4096))
        else:
            off = max(0, size - self.rng.randint(0, n))
        return off, n

    def _apply_write(self, off: int, data: bytes) -> None:
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + len(data)] = data

    def _apply_size(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def _new_size(self) -> int:
        size = len(self.model)
        r = self.rng.random()
        if r < 0.45:
            return self.rng.randint(0, size)
        if r < 0.6:  # next to a block boundary
            b = self.rng.randrange(0, self.max_size // BLOCK + 1) * BLOCK
            return max(0, min(self.max_size, b + self.rng.randint(-3, 3)))
        return self.rng.randint(size, self.max_size)

    def _pwrite(self, fd: int, data: bytes, off: int) -> None:
        n = os.pwrite(fd, data, off)
        if n != len(data):
            self.fail(f"short write {n} of {len(data)} at {off}")

    def _pread_all(self, fd: int, n: int, off: int) -> bytes:
        parts = []
        while n > 0:
            chunk = os.pread(fd, n, off)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
            off += len(chunk)
        return b"".join(parts)

    # --- the operations ----------------------------------------------------------------

    def step(self) -> None:
        self.ops += 1
        if self.far_every and self.ops % self.far_every == 0:
            self.op_far()
            return
        fn = self._ops[bisect.bisect_right(self._cum, self.rng.randrange(self._cum[-1]))]
        name = fn.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        fn()

    def op_write(self, fd: int | None = None, label: str = "write") -> None:
        n = self._length()
        off = self._offset(n)
        data = self._data(n)
        self.note(f"{label} {off}+{n} (size {len(self.model)})")
        self._pwrite(self.fd if fd is None else fd, data, off)
        self._apply_write(off, data)

    def op_direct_write(self) -> None:
        self.op_write(self.dfd, "direct write")

    def op_zero(self) -> None:
        n = self._length()
        off = self._offset(n)
        if self.rng.random() < 0.5 and len(self.model):  # inside the data
            off = self.rng.randrange(0, len(self.model))
            n = max(1, min(n, len(self.model) - off))
        fd = self.dfd if self.rng.random() < 0.3 else self.fd
        self.note(f"zero {off}+{n} ({'direct' if fd == self.dfd else 'cached'}, "
                  f"size {len(self.model)})")
        self._pwrite(fd, bytes(n), off)
        self._apply_write(off, bytes(n))

    def op_read(self, fd: int | None = None, label: str = "read") -> None:
        off, n = self._range()
        self.note(f"{label} {off}+{n} (size {len(self.model)})")
        got = self._pread_all(self.fd if fd is None else fd, n, off)
        self.expect(got, off, label)

    def op_direct_read(self) -> None:
        self.op_read(self.dfd, "direct read")

    def op_truncate(self) -> None:
        size = self._new_size()
        self.note(f"truncate {len(self.model)} -> {size}")
        os.truncate(self.path, size)
        self._apply_size(size)

    def op_ftruncate(self) -> None:
        size = self._new_size()
        self.note(f"ftruncate {len(self.model)} -> {size}")
        os.ftruncate(self.fd, size)
        self._apply_size(size)

    def op_fallocate(self) -> None:
        """posix_fallocate: FUSE without fallocate makes glibc write zero bytes per block."""
        n = self.rng.randint(1, 300 * KIB)
        off = self._offset(n)
        self.note(f"posix_fallocate {off}+{n} (size {len(self.model)})")
        os.posix_fallocate(self.fd, off, n)
        if off + n > len(self.model):
            self._apply_size(off + n)

    def _map_range(self) -> tuple[int, int] | None:
        size = len(self.model)
        if size == 0:
            return None
        start = self.rng.randrange(0, size) // PAGE * PAGE
        length = min(size - start, self.rng.randint(1, 256 * KIB))
        return start, length

    def op_mmap_read(self) -> None:
        rng = self._map_range()
        if rng is None:
            return
        start, length = rng
        self.note(f"mmap read {start}+{length} (size {len(self.model)})")
        with mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as m:
            a = self.rng.randrange(0, length)
            b = self.rng.randint(a, length)
            self.expect(m[a:b], start + a, "mmap read")

    def op_mmap_write(self) -> None:
        rng = self._map_range()
        if rng is None:
            return
        start, length = rng
        a = self.rng.randrange(0, length)
        b = min(length, a + self.rng.randint(1, 64 * KIB))
        data = self._data(b - a)
        self.note(f"mmap write {start + a}+{b - a} (size {len(self.model)})")
        with mmap.mmap(self.fd, length, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as m:
            m[a:b] = data
            m.flush()  # msync(MS_SYNC)
        self._apply_write(start + a, data)

    def op_fsync(self) -> None:
        if self.rng.random() < 0.3:
            self.note("fdatasync")
            os.fdatasync(self.fd)
        else:
            self.note("fsync")
            os.fsync(self.fd)

    def op_drop_cache(self) -> None:
        """fsync, then drop the file's pages so the next reads come from the daemon."""
        self.note("drop page cache")
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_reopen(self) -> None:
        self.note("close and reopen")
        self.close()
        self.open()
        self.op_stat()

    def op_stat(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            self.fail(f"fstat size {size}, model {len(self.model)}")
        size = os.stat(self.path).st_size
        if size != len(self.model):
            self.fail(f"stat size {size}, model {len(self.model)}")

    def op_far(self) -> None:
        """A sparse excursion past 4 GiB: write or extend there, check, truncate back."""
        size = len(self.model)
        off = 4 * GIB + self.rng.randrange(0, 2 * GIB)
        if self.rng.random() < 0.5:
            off = off // BLOCK * BLOCK - self.rng.randint(1, 100)  # straddle a block
        fd = self.dfd if self.rng.random() < 0.3 else self.fd
        if self.rng.random() < 0.25:
            self.note(f"far ftruncate up to {off} then back to {size}")
            os.ftruncate(self.fd, off)
            end, data = off, b""
        else:
            data = self._data(self.rng.randint(1, 200 * KIB))
            self.note(f"far write {off}+{len(data)} then truncate back to {size}")
            self._pwrite(fd, data, off)
            end = off + len(data)
        if os.fstat(self.fd).st_size != end:
            self.fail(f"size {os.fstat(self.fd).st_size} after far operation, want {end}")
        if data and self._pread_all(self.fd, len(data), off) != data:
            self.fail("far data read back wrong")
        for probe in (off - 5000, size + 10, (size + off) // 2):
            if probe >= size:
                got = self._pread_all(self.rng.choice((self.fd, self.dfd)), 4096, probe)
                if got != bytes(min(4096, end - probe)):
                    self.fail(f"far hole at {probe} not zero: {got[:32].hex()}")
        tail = max(0, size - 1000)
        got = self._pread_all(self.fd, 2000, tail)
        if got[: size - tail] != self.model[tail:] or got[size - tail :].strip(b"\0"):
            self.fail(f"data around old EOF {size} wrong after far operation")
        if self.rng.random() < 0.5:
            os.ftruncate(self.fd, size)
        else:
            os.truncate(self.path, size)
        self.op_stat()
        self.counts["op_far"] = self.counts.get("op_far", 0) + 1

    # --- whole-file checks -------------------------------------------------------------

    def check_all(self, what: str, direct: bool = False) -> None:
        """Compare the whole file with the model (O_DIRECT reads ask the daemon)."""
        self.note(f"full compare ({what}{', direct' if direct else ''})")
        self.op_stat()
        got = self._pread_all(self.dfd if direct else self.fd, len(self.model) + 4096, 0)
        if got != self.model:
            self.fail(f"full compare {what}: {first_difference(got, self.model)}")


def run(files: list[FileExerciser], nops: int, check_every: int = 1000) -> None:
    """Step the files in turn, ``nops`` operations in all, with periodic full compares."""
    for i in range(1, nops + 1):
        f = files[i % len(files)]
        f.step()
        if i % check_every == 0:
            f.check_all(f"periodic {i}", direct=(i // check_every) % 2 == 0)
