"""History is exact, also after prune: random histories checked against a model.

A Python model (path -> kind, content or symlink target, permission bits, xattrs)
mirrors every operation a test runs through a real mount. After each operation
the test records a *moment*: the journal sequence number it ended at (read
through the library after an fsync of the mount root) and a wall-clock time T
between it and the next operation. Every recorded moment must then show, byte
for byte, the model's snapshot of that moment under ``@#seq`` and under
``@<local time with ns>``, and, after retention has thinned the history and
``prune`` has deleted what no kept point needs, every kept point must still
show exactly the same tree (through the mount, and through ``View`` with a
clock shifted two days ahead). The last tests take a bookmark of a SQLite
database under write load with the shipped scenario and check that the
bookmarked database is complete and intact.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import Volume, cdpfs, settle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdpfs.history.moments import BadMoment
from cdpfs.history.points import Points, resolve
from cdpfs.store import journal
from cdpfs.store.lmdb import Store
from cdpfs.store.schema import ROOT_INO
from cdpfs.store.view import View
from cdpfs.volume import prune

BLOCK = 128 * 1024
FILES = [f"f{i}" for i in range(6)]
DIRS = ["d0", "d1", "d2"]
LINK_TARGETS = ["f0", "../d1/f2", "nowhere", "/abs/elsewhere", "d0/", "x" * 200]
SCENARIO = Path("/work/main/contrib/scenarios/sqlite.toml")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


UMASK = _umask()

# path (relative to the modelled directory) -> (kind, content or target, mode bits, xattrs)
Entry = tuple[str, bytes, int, tuple[tuple[str, bytes], ...]]
Tree = dict[str, Entry]
Op = tuple[str, int, int, int, int, int]


# --- the model ------------------------------------------------------------------------------


@dataclass
class Node:
    """One name of the model: a directory ("d"), file ("f") or symlink ("l")."""

    kind: str
    data: bytes = b""
    mode: int = 0o644
    xattrs: dict[str, bytes] = field(default_factory=dict)


def payload(seed: int, size: int) -> bytes:
    """``size`` bytes from ``seed``: incompressible for odd seeds, repetitive for even."""
    rnd = random.Random(seed)
    if seed % 2:
        return rnd.randbytes(size)
    chunk = rnd.randbytes(rnd.randint(1, 64))
    return (chunk * (size // len(chunk) + 1))[:size]


class Model:
    """A directory tree run through the real filesystem and mirrored in memory.

    Every operation is turned into one that is valid on the model's current state
    (or skipped), run on the real directory ``root``, and applied to the model.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, Node] = {}
        self.done: list[str] = []  # what ran, for failure messages

    # helpers

    def real(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, n in self.nodes.items() if n.kind in kinds)

    def dirs(self) -> list[str]:
        return ["", *self.of_kind("d")]

    @staticmethod
    def join(parent: str, name: str) -> str:
        return f"{parent}/{name}" if parent else name

    def children(self, path: str) -> list[str]:
        pre = path + "/" if path else ""
        return [p for p in self.nodes if p.startswith(pre) and "/" not in p[len(pre):]]

    def snapshot(self) -> Tree:
        return {p: (n.kind, n.data, n.mode, tuple(sorted(n.xattrs.items())))
                for p, n in self.nodes.items()}

    # operations

    def apply(self, op: Op) -> None:
        """Run ``op`` on the real tree and the model (skipped if it cannot apply)."""
        name, a, b, c, d, seed = op
        desc = getattr(self, "op_" + name)(a, b, c, d, seed)
        if desc:
            self.done.append(desc)

    def op_create(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        dirs = self.dirs()
        path = self.join(dirs[a % len(dirs)], FILES[b % len(FILES)])
        node = self.nodes.get(path)
        if node is not None and node.kind != "f":
            return None
        data = payload(seed, d % 5000) if seed % 3 else b""
        fd = os.open(self.real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if node is None:
            self.nodes[path] = Node("f", data, 0o644 & ~UMASK)
        else:
            node.data = data
        return f"create {path} ({len(data)} bytes)"

    def op_write(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        files = self.of_kind("f")
        if not files:
            return self.op_create(a, b, c, d, seed)
        path = files[a % len(files)]
        node = self.nodes[path]
        off = len(node.data) if c < 0 else c
        data = payload(seed, d)
        fd = os.open(self.real(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, off) == len(data)
        finally:
            os.close(fd)
        old = node.data.ljust(off, b"\0")
        node.data = old[:off] + data + old[off + len(data):]
        return f"write {path} at {off}: {len(data)} bytes (seed {seed})"

    def op_truncate(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        files = self.of_kind("f")
        if not files:
            return None
        path = files[a % len(files)]
        node = self.nodes[path]
        size = 0 if c < 0 else len(node.data) // 2 if d % 3 == 0 else c
        os.truncate(self.real(path), size)
        node.data = node.data[:size].ljust(size, b"\0")
        return f"truncate {path} to {size}"

    def op_unlink(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        names = self.of_kind("f", "l")
        if not names:
            return None
        path = names[a % len(names)]
        os.unlink(self.real(path))
        del self.nodes[path]
        return f"unlink {path}"

    def op_rename(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        names = sorted(self.nodes)
        if not names:
            return None
        src = names[a % len(names)]
        kind = self.nodes[src].kind
        dirs = self.dirs()
        parent = dirs[b % len(dirs)]
        pool = DIRS if kind == "d" else FILES
        dst = self.join(parent, pool[(c + d) % len(pool)])
        if dst == src:
            return None
        over = self.nodes.get(dst)
        if kind == "d":
            if parent == src or parent.startswith(src + "/"):
                return None  # into itself
            if over is not None and (over.kind != "d" or self.children(dst)):
                return None
        elif over is not None and over.kind == "d":
            return None
        os.rename(self.real(src), self.real(dst))
        moved = {p: n for p, n in self.nodes.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.nodes[p]
        self.nodes.pop(dst, None)
        for p, n in moved.items():
            self.nodes[dst + p[len(src):]] = n
        return f"rename {src} -> {dst}" + (" (over an existing name)" if over else "")

    def op_mkdir(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        dirs = [p for p in self.dirs() if p.count("/") < 1]
        path = self.join(dirs[a % len(dirs)], DIRS[b % len(DIRS)])
        if path in self.nodes:
            return None
        os.mkdir(self.real(path), 0o777)
        self.nodes[path] = Node("d", b"", 0o777 & ~UMASK)
        return f"mkdir {path}"

    def op_rmdir(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        empty = [p for p in self.of_kind("d") if not self.children(p)]
        if not empty:
            return None
        path = empty[a % len(empty)]
        os.rmdir(self.real(path))
        del self.nodes[path]
        return f"rmdir {path}"

    def op_chmod(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        names = self.of_kind("f", "d")
        if not names:
            return None
        path = names[a % len(names)]
        mode = seed & 0o777
        if self.nodes[path].kind == "d":
            mode |= 0o700  # keep directories usable for their owner
        os.chmod(self.real(path), mode)
        self.nodes[path].mode = mode
        return f"chmod {path} {mode:o}"

    def op_symlink(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        dirs = self.dirs()
        path = self.join(dirs[a % len(dirs)], FILES[b % len(FILES)])
        if path in self.nodes:
            return None
        target = LINK_TARGETS[seed % len(LINK_TARGETS)]
        os.symlink(target, self.real(path))
        self.nodes[path] = Node("l", target.encode(), 0o777)
        return f"symlink {path} -> {target}"

    def op_setxattr(self, a: int, b: int, c: int, d: int, seed: int) -> str | None:
        names = self.of_kind("f", "d")
        if not names:
            return None
        path = names[a % len(names)]
        node = self.nodes[path]
        key = f"user.k{b % 3}"
        if key in node.xattrs and d % 4 == 0:
            os.removexattr(self.real(path), key)
            del node.xattrs[key]
            return f"removexattr {path} {key}"
        value = payload(seed, d % 200)
        os.setxattr(self.real(path), key, value)
        node.xattrs[key] = value
        return f"setxattr {path} {key} ({len(value)} bytes)"


OP_NAMES = ["write"] * 5 + ["truncate", "truncate", "create", "create", "unlink", "rename",
                            "rename", "mkdir", "rmdir", "chmod", "symlink", "setxattr"]
OFFSETS = st.one_of(st.integers(0, 3).map(lambda k: k * BLOCK), st.integers(0, 400_000),
                    st.just(-1))
SIZES = st.one_of(st.integers(1, 64), st.integers(1, 8192), st.integers(8192, 300 * 1024),
                  st.sampled_from([BLOCK, 2 * BLOCK]))
OPS = st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 63), st.integers(0, 63), OFFSETS,
                SIZES, st.integers(0, 2**31))


def random_ops(rnd: random.Random, count: int) -> list[Op]:
    """``count`` operations drawn like OPS, from a seeded generator."""
    out: list[Op] = []
    for _ in range(count):
        r = rnd.random()
        off = rnd.choice([rnd.randrange(4) * BLOCK, rnd.randrange(400_000), -1])
        size = (rnd.randint(1, 64) if r < 0.25 else rnd.randint(1, 8192) if r < 0.5
                else rnd.randint(8192, 300 * 1024) if r < 0.85 else rnd.choice([BLOCK, 2 * BLOCK]))
        out.append((rnd.choice(OP_NAMES), rnd.randrange(64), rnd.randrange(64), off, size,
                    rnd.randrange(2**31)))
    return out


# --- reading trees ----------------------------------------------------------------------------


def read_tree(root: Path) -> Tree:
    """The tree under ``root`` as the model describes it (names, kinds, bytes, bits, xattrs)."""
    out: Tree = {}

    def walk(path: Path, rel: str) -> None:
        for name in sorted(os.listdir(path)):
            p = path / name
            r = f"{rel}/{name}" if rel else name
            st_ = os.lstat(p)
            attrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                 for k in os.listxattr(p, follow_symlinks=False)))
            if stat.S_ISDIR(st_.st_mode):
                out[r] = ("d", b"", stat.S_IMODE(st_.st_mode), attrs)
                walk(p, r)
            elif stat.S_ISLNK(st_.st_mode):
                out[r] = ("l", os.readlink(p).encode(), stat.S_IMODE(st_.st_mode), attrs)
            else:
                assert stat.S_ISREG(st_.st_mode), f"{p}: unexpected file type {st_.st_mode:o}"
                out[r] = ("f", p.read_bytes(), stat.S_IMODE(st_.st_mode), attrs)

    walk(root, "")
    return out


def view_tree(view: View, top: str = "") -> Tree:
    """The same description of a tree, read through the library at ``view.seq``."""
    out: Tree = {}

    def walk(ino: int, rel: str) -> None:
        for raw, child in view.listdir(ino):
            name = raw.decode()
            r = f"{rel}/{name}" if rel else name
            node = view.inode(child)
            assert node is not None, f"{r}: name without inode at #{view.seq}"
            attrs = tuple(sorted((k.decode(), view.xattr(child, k) or b"")
                                 for k in view.xattrs(child)))
            mode = stat.S_IMODE(node.mode)
            if node.is_dir:
                out[r] = ("d", b"", mode, attrs)
                walk(child, r)
            elif node.is_lnk:
                out[r] = ("l", node.target, mode, attrs)
            else:
                out[r] = ("f", view.read(child, 0, node.size, node.size), mode, attrs)

    walk(view.resolve(top) if top else ROOT_INO, "")
    return out


def _short(e: Entry) -> str:
    kind, data, mode, attrs = e
    what = {"d": "dir", "f": f"file of {len(data)} bytes", "l": f"symlink -> {data[:40]!r}"}
    return f"{what[kind]}, mode {mode:o}, xattrs {[k for k, _ in attrs]}"


def tree_diff(want: Tree, got: Tree) -> str:
    """What differs, one line per path (empty when equal)."""
    lines = []
    for p in sorted(want.keys() | got.keys()):
        w, g = want.get(p), got.get(p)
        if w == g:
            continue
        if w is None:
            lines.append(f"  extra   {p}: {_short(g)}")  # type: ignore[arg-type]
        elif g is None:
            lines.append(f"  missing {p}: {_short(w)}")
        else:
            extra = ""
            if w[0] == g[0] == "f" and w[1] != g[1]:
                first = next((i for i, (x, y) in enumerate(zip(w[1], g[1], strict=False))
                              if x != y), min(len(w[1]), len(g[1])))
                extra = f"; content differs from byte {first}"
            if w[3] != g[3]:
                extra += f"; xattrs want {w[3]!r:.200} got {g[3]!r:.200}"
            lines.append(f"  differs {p}: want {_short(w)}, got {_short(g)}{extra}")
    return "\n".join(lines)


def assert_tree(path: Path, want: Tree, what: str) -> None:
    got = read_tree(path)
    diff = tree_diff(want, got)
    assert not diff, f"{what} ({path}) differs from the model:\n{diff}"


# --- moments ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """A recorded point: the last journal seq, a wall-clock time after it, the model state."""

    seq: int
    t_ns: int
    tree: Tree


def record(mnt: Path, store: Store, model: Model) -> Moment:
    settle(mnt)
    with store.txn() as txn:
        seq, _ = journal.last(store, txn)
    time.sleep(0.02)
    t_ns = time.time_ns()
    time.sleep(0.02)
    return Moment(seq, t_ns, model.snapshot())


def local_name(t_ns: int) -> str:
    """``@`` name of a wall-clock time: local ISO time with a 9-digit fraction."""
    base = dt.datetime.fromtimestamp(t_ns // 10**9).strftime("%Y-%m-%dT%H:%M:%S")
    return f"@{base}.{t_ns % 10**9:09d}"


def run_history(vol: Volume, sub: str, ops: list[Op], store: Store
                ) -> tuple[Model, list[Moment]]:
    """Make ``sub`` in the volume, run ``ops`` in it, a moment after each."""
    os.mkdir(vol.mnt / sub)
    model = Model(vol.mnt / sub)
    moments = [record(vol.mnt, store, model)]
    for op in ops:
        model.apply(op)
        moments.append(record(vol.mnt, store, model))
    return model, moments


def history_text(model: Model) -> str:
    return "operations run:\n  " + "\n  ".join(model.done)


def absent(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False


# --- 1. every moment shows exactly the model's state -------------------------------------------

_examples = itertools.count()


@settings(max_examples=70, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=24))
def test_every_moment_shows_exactly_its_state(volume: Volume, ops: list[Op]) -> None:
    sub = f"ex{next(_examples)}"
    store = Store(volume.store)
    try:
        model, moments = run_history(volume, sub, ops, store)
    finally:
        store.close()
    assert_tree(volume.mnt / sub, model.snapshot(), "live tree\n" + history_text(model))
    for i, m in enumerate(moments):
        why = f"moment {i} (#{m.seq})\n{history_text(model)}"
        assert_tree(volume.mnt / f"@#{m.seq}" / sub, m.tree, why)
        assert_tree(volume.mnt / local_name(m.t_ns) / sub, m.tree, why)


# --- 2. after prune, kept points are unchanged ------------------------------------------------


def stat_history_mib(mnt: Path) -> float:
    out = cdpfs("stat", mnt).stdout
    m = re.search(r"^history\s+([\d,.]+) MiB", out, re.M)
    assert m, f"no history line in cdpfs stat:\n{out}"
    return float(m[1].replace(",", ""))


def kept_seqs(store: Store, upto: int) -> set[int]:
    with store.txn() as txn:
        points = Points(store, txn)
        return {s for s in range(1, upto + 1) if points.is_kept(s)}


def test_prune_keeps_every_kept_point_exact(volume: Volume) -> None:
    # Thinning keeps the last record of each minute: run the history inside one minute,
    # so the only kept points inside it are the bookmarks (and the newest record).
    if time.time() % 60 > 48:
        time.sleep(60.2 - time.time() % 60)
    mnt = volume.mnt
    rnd = random.Random(20261125)
    (mnt / "big").write_bytes(rnd.randbytes(1 << 20))
    settle(mnt)
    (mnt / "big").write_bytes(rnd.randbytes(1 << 20))  # the first version is history only
    store = Store(volume.store)
    try:
        model, moments = run_history(volume, "w", random_ops(rnd, 60), store)
        big = (mnt / "big").read_bytes()
        marked = sorted(rnd.sample(range(1, len(moments)), 5))
        for i in marked:
            out = cdpfs("bookmark", f"b{i}", "--at", f"#{moments[i].seq}", "--volume", mnt)
            assert f"#{moments[i].seq}" in out.stdout
        cdpfs("retention", mnt, "--keep-all", "1s")
        time.sleep(1.5)
        history_before = stat_history_mib(mnt)
        last = moments[-1].seq
        kept_before = kept_seqs(store, last)
        out = cdpfs("prune", mnt).stdout
        m = re.search(r": (\d+) versions", out)
        assert m and int(m[1]) > 0, f"prune removed no versions: {out}"
        kept = kept_seqs(store, last)
    finally:
        store.close()
    why = history_text(model)
    assert kept == kept_before, "prune changed which points are kept"
    seqs = {m.seq for m in moments}
    first = moments[0].seq
    stray = sorted(k for k in kept if first <= k <= last and k not in seqs)
    assert not stray, f"kept points that are no recorded moment (minute boundary?): {stray}"
    assert {moments[i].seq for i in marked} <= kept

    for i in marked:
        m = moments[i]
        assert_tree(mnt / f"@b{i}" / "w", m.tree, f"bookmark b{i} (#{m.seq})\n{why}")
        assert_tree(mnt / f"@#{m.seq}" / "w", m.tree, f"@#{m.seq} (bookmark b{i})\n{why}")
    assert_tree(mnt / "w", model.snapshot(), "live tree after prune\n" + why)
    assert (mnt / "big").read_bytes() == big

    thinned = sorted(seqs - kept)
    assert thinned, "every recorded moment was kept: nothing was thinned"
    for seq in thinned:
        assert absent(mnt / f"@#{seq}"), f"@#{seq} is not kept but still resolves"

    for i, m in enumerate(moments):
        k = max((s for s in kept if s <= m.seq), default=0)
        path = mnt / local_name(m.t_ns)
        if k == 0:
            assert absent(path), f"moment {i}: {path.name} resolves though no point before it"
        elif k < first:
            assert absent(path / "w"), f"moment {i}: {path.name}/w exists before mkdir w"
        else:
            src = next(j for j, x in enumerate(moments) if x.seq == k)
            assert_tree(path / "w", moments[src].tree,
                        f"moment {i} (#{m.seq}) by time, kept point #{k} (moment {src})\n{why}")

    history_after = stat_history_mib(mnt)
    assert history_after < history_before, (
        f"history stored did not go down: {history_before} MiB -> {history_after} MiB")


def test_verify_passes_after_prune(volume: Volume) -> None:
    """The smallest history whose prune drops inode versions that names made at the same
    seq outlive (mkdir w, then a file in it changes w again): the fixture's
    ``cdpfs verify`` after unmount must still find the store sound."""
    (volume.mnt / "w").mkdir()
    time.sleep(0.05)  # so that creating a changes w's times: a new version of w
    (volume.mnt / "w" / "a").write_text("hi")
    cdpfs("retention", volume.mnt, "--keep-all", "1s")
    time.sleep(1.5)
    out = cdpfs("prune", volume.mnt).stdout
    assert re.search(r": [1-9]\d* versions", out), out
    assert (volume.mnt / "w" / "a").read_text() == "hi"


def test_verify_passes_after_prune_of_a_removed_directory(volume: Volume) -> None:
    """A bookmark keeps d/f; then f is removed and d too, with no kept point between:
    prune drops the name's removal (nothing kept shows d then). The fixture's
    ``cdpfs verify`` after unmount must still find the store sound."""
    (volume.mnt / "d").mkdir()
    (volume.mnt / "d" / "f").write_text("x")
    cdpfs("bookmark", "b", "--volume", volume.mnt)
    (volume.mnt / "d" / "f").unlink()
    (volume.mnt / "d").rmdir()
    cdpfs("retention", volume.mnt, "--keep-all", "1s")
    time.sleep(1.5)
    out = cdpfs("prune", volume.mnt).stdout
    assert re.search(r": [1-9]\d* versions", out), out
    assert (volume.mnt / "@b" / "d" / "f").read_text() == "x"
    assert absent(volume.mnt / "d")


# --- 3. library prune with a shifted clock ----------------------------------------------------


def trees_at(store: Store, seqs: set[int]) -> dict[int, Tree]:
    with store.txn() as txn:
        return {s: view_tree(View(store, txn, s)) for s in sorted(seqs)}


def kept_at(store: Store, now_ns: int) -> tuple[int, set[int]]:
    with store.txn() as txn:
        points = Points(store, txn, now_ns=now_ns)
        return points.last, {s for s in range(1, points.last + 1) if points.is_kept(s)}


def check_prune(store: Store, now_ns: int, moments: list[Moment]) -> set[int]:
    """Prune as of ``now_ns``: kept seqs show identical trees, the others are refused."""
    last, kept = kept_at(store, now_ns)
    before = trees_at(store, kept)
    for m in moments:  # kept moments also equal the model
        if m.seq in kept:
            tree = before[m.seq]
            assert "w" in tree, f"#{m.seq}: no w"
            diff = tree_diff(m.tree, {p[2:]: e for p, e in tree.items() if p.startswith("w/")})
            assert not diff, f"#{m.seq} before prune differs from the model:\n{diff}"
    result = prune(store, now_ns=now_ns)
    assert result.versions > 0 and result.records > 0, result
    after = trees_at(store, kept)
    for s in sorted(kept):
        diff = tree_diff(before[s], after[s])
        assert not diff, f"kept #{s} changed by prune (now={now_ns}):\n{diff}"
    _, kept_after = kept_at(store, now_ns)
    assert kept_after == kept, "prune changed which points are kept"
    with store.txn() as txn:
        for s in range(1, last + 1):
            if s in kept:
                assert resolve(store, txn, f"#{s}", now_ns).seq == s

            else:
                with pytest.raises(BadMoment):
                    resolve(store, txn, f"#{s}", now_ns)
    return kept


def test_library_prune_with_shifted_clock(volume: Volume) -> None:
    rnd = random.Random(7)
    store = Store(volume.store)
    try:
        model, moments = run_history(volume, "w", random_ops(rnd, 40), store)
    finally:
        store.close()
    volume.umount()
    span = (moments[-1].t_ns - moments[0].t_ns) / 1e9
    assert span > 1.5, f"history spread over only {span:.1f}s"
    cdpfs("retention", volume.store, "--keep-all", "2s")

    store = Store(volume.store)
    store.lock("test_library_prune_with_shifted_clock")
    try:
        # First as of 2 s after the middle of the history: the newer half is kept whole.
        mid = moments[len(moments) // 2].t_ns
        kept1 = check_prune(store, mid + 2 * 10**9, moments)
        # Then two days later: everything is thinned to one point per minute.
        now = time.time_ns() + 2 * 86400 * 10**9
        kept2 = check_prune(store, now, moments)
        assert kept2 <= kept1, "a point thinned earlier came back"
        again = prune(store, now_ns=now)
        assert (again.versions, again.records, again.blocks, again.packs) == (0, 0, 0, 0), again
    finally:
        store.close()
    volume.mount()
    assert_tree(volume.mnt / "w", model.snapshot(), "live tree after prune\n" + history_text(model))


# --- 4. a SQLite bookmark under write load --------------------------------------------------


class Writer(threading.Thread):
    """Insert rows 1, 2, 3 ... each in its own committed transaction, ``pause`` s apart.

    Automatic checkpoints are off, so the database file changes only when the
    scenario's hook checkpoints it.
    """

    def __init__(self, db: Path, pause: float) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.pause = pause
        self.began = 0  # id whose COMMIT was last begun
        self.committed = 0  # id whose COMMIT last returned
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA wal_autocheckpoint=0")
                i = 0
                while not self.stop.is_set():
                    i += 1
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, os.urandom(200)))
                    self.began = i
                    conn.execute("COMMIT")
                    self.committed = i
                    if self.pause:
                        time.sleep(self.pause)
            finally:
                conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


@dataclass
class Bookmarked:
    """A bookmark taken under load: the rows it must hold at least and at most."""

    proc: subprocess.CompletedProcess[str]
    c1: int  # last id committed before the bookmark command started
    c2: int  # last id whose commit began before the command finished
    seconds: float


def bookmark_under_load(vol: Volume, pause: float, *sets: str) -> Bookmarked:
    """Run a writer on db.sqlite (WAL) and take bookmark ``snap`` with the SQLite scenario."""
    db = vol.mnt / "db.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    finally:
        conn.close()
    writer = Writer(db, pause)
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while writer.committed < 200 and writer.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.error is None and writer.committed >= 200, writer.error
        c1 = writer.committed
        t0 = time.monotonic()
        proc = cdpfs("bookmark", "snap", "--volume", vol.mnt, "--scenario", SCENARIO,
                     "--set", "DB=db.sqlite", *sets, check=False)
        c2 = writer.began
        seconds = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        writer.stop.set()
        writer.join(30)
    assert not writer.is_alive()
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    assert writer.committed > c2, "the writer did not go on after the bookmark"
    return Bookmarked(proc, c1, c2, seconds)


def rows_of(src: Path, dst: Path, with_wal: bool) -> list[int]:
    """Copy the bookmarked database (and its WAL) to ``dst``; check it; its ids."""
    dst.mkdir()
    for suffix in ("", "-wal") if with_wal else ("",):
        if (src / f"db.sqlite{suffix}").exists():
            shutil.copyfile(src / f"db.sqlite{suffix}", dst / f"db.sqlite{suffix}")
    conn = sqlite3.connect(dst / "db.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
    finally:
        conn.close()
    assert ids == list(range(1, len(ids) + 1)), "the bookmarked table has gaps"
    return ids


def test_sqlite_bookmark_under_load(volume: Volume, tmp_path: Path) -> None:
    if shutil.which("sqlite3") is None:
        pytest.skip("needs the sqlite3 command")
    b = bookmark_under_load(volume, 0.0005)
    assert b.proc.returncode == 0, b.proc.stderr
    n = len(rows_of(volume.mnt / "@snap", tmp_path / "copy", with_wal=True))
    assert b.c1 <= n <= b.c2, f"bookmark has {n} rows; committed before: {b.c1}, " \
                              f"begun by the end: {b.c2}"
    # The hook checkpointed the WAL into the database file: alone, it holds every row
    # committed before the bookmark command started.
    alone = len(rows_of(volume.mnt / "@snap", tmp_path / "alone", with_wal=False))
    assert b.c1 <= alone <= n, f"database file alone: {alone} rows, committed before: {b.c1}"


def test_sqlite_scenario_under_constant_load(volume: Volume, tmp_path: Path) -> None:
    """A writer that never pauses keeps ``PRAGMA wal_checkpoint(TRUNCATE)`` from
    truncating the WAL: SQLite answers busy after the timeout, having copied what it
    could. The bookmark must then either fail with one line, or its database file must
    really hold what was committed before it."""
    if shutil.which("sqlite3") is None:
        pytest.skip("needs the sqlite3 command")
    b = bookmark_under_load(volume, 0.0, "--set", "TIMEOUT_MS=1500")
    if b.proc.returncode != 0:
        _one_line_error(b.proc)
        assert absent(volume.mnt / "@snap")
        return
    n = len(rows_of(volume.mnt / "@snap", tmp_path / "copy", with_wal=True))
    assert b.c1 <= n <= b.c2
    alone = len(rows_of(volume.mnt / "@snap", tmp_path / "alone", with_wal=False))
    assert alone >= b.c1, (
        f"the bookmark succeeded ({b.proc.stdout.strip()}, after {b.seconds:.1f}s) but its "
        f"database file alone holds {alone} rows of the {b.c1} committed before it")


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdpfs: error: "), proc.stderr
    return lines[0]


def test_scenario_failures_make_no_bookmark(volume: Volume, tmp_path: Path) -> None:
    (volume.mnt / "data").write_text("x")
    failing = tmp_path / "fail.toml"
    failing.write_text('description = "fails"\n[[before]]\nrun = "exit 3"\n')
    err = _one_line_error(cdpfs("bookmark", "bad", "--volume", volume.mnt, "--scenario",
                                failing, check=False))
    assert "exit 3" in err

    unset = tmp_path / "unset.toml"
    unset.write_text('[vars]\nX = ""\n[[before]]\nrun = "touch ran-$X"\n')
    err = _one_line_error(cdpfs("bookmark", "bad2", "--volume", volume.mnt, "--scenario",
                                unset, check=False))
    assert "X" in err and "--set" in err
    assert not list(volume.mnt.glob("ran-*")), "the hook ran though a variable was unset"

    listed = cdpfs("bookmarks", "--volume", volume.mnt).stdout
    assert "bad" not in listed, listed
    assert absent(volume.mnt / "@bad") and absent(volume.mnt / "@bad2")
    # The same scenario with the variable set works.
    cdpfs("bookmark", "good", "--volume", volume.mnt, "--scenario", unset, "--set", "X=1")
    assert (volume.mnt / "ran-1").exists()
    assert (volume.mnt / "@good" / "data").read_text() == "x"

