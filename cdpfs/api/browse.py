"""The history the console shows, read from a store open in this process: a
directory at a moment, a file's versions, a text diff between two of them, and
the volume's timeline (writes per interval, bookmarks, tests, backups).

Each is one JSON document, computed in a worker thread by the node API. They
read the committed state (a live mount commits within a quarter of a second).
Sizes are bounded: a listing shows at most ``MAX_ENTRIES`` entries, a diff
compares files of at most ``MAX_DIFF`` bytes, a timeline counts at most
``MAX_SCAN`` records (and says so when it stopped short).
"""

from __future__ import annotations

import difflib
import stat
from typing import Any

from ..backups import schedule
from ..drtests import last as last_test
from ..errors import CdpfsError
from ..history import bookmarks
from ..history.points import resolve
from ..history.stats import space_stats
from ..history.versions import diff, versions
from ..names import volume_path
from ..store import journal
from ..store.lmdb import Store
from ..store.view import View
from .documents import changes_document, iso, space_document

MAX_ENTRIES = 5000
MAX_DIFF = 1 << 20
MAX_SCAN = 200_000
MAX_VERSIONS = 200

KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link"}


def _rel(path: str) -> str:
    """'' for the root, else the checked relative path."""
    return "" if path.strip("/") == "" else volume_path(path)


def listing(store: Store, at: str, path: str, now_ns: int | None = None) -> dict[str, Any]:
    """The directory ``path`` as it was at moment ``at``."""
    rel = _rel(path)
    with store.txn() as txn:
        point = resolve(store, txn, at, now_ns)
        view = View(store, txn, point.seq)
        ino = view.resolve(rel)
        node = view.inode(ino)
        if node is None or not node.is_dir:
            raise CdpfsError(f"{rel or '/'}: not a directory at #{point.seq}")
        entries = []
        for name, child in view.listdir(ino):
            inode = view.inode(child)
            if inode is None:
                continue
            entries.append({"name": name.decode("utf-8", "replace"),
                            "kind": KINDS.get(stat.S_IFMT(inode.mode), "other"),
                            "size": inode.size, "mtime": iso(inode.mtime)})
            if len(entries) == MAX_ENTRIES:
                break
    return {"path": rel, "seq": point.seq, "time": iso(point.ts),
            "entries": sorted(entries, key=lambda e: (e["kind"] != "dir", e["name"])),
            "complete": len(entries) < MAX_ENTRIES}


def file_versions(store: Store, path: str) -> dict[str, Any]:
    """The versions of the file now at ``path`` (or last there), newest first."""
    rel = volume_path(path)
    with store.txn() as txn:
        view = View(store, txn)
        ino = view.resolve(rel)
        found = []
        for v in versions(store, txn, ino):
            found.append({"seq": v.seq, "time": iso(v.ts), "op": v.op,
                          "size": None if v.node is None else v.node.size})
            if len(found) == MAX_VERSIONS:
                break
    return {"path": rel, "versions": found}


def text_diff(store: Store, path: str, a: str, b: str, now_ns: int | None = None
              ) -> dict[str, Any]:
    """A unified diff of the file at ``path`` between moments ``a`` and ``b``
    (``binary``: not both text)."""
    rel = volume_path(path)
    texts: list[list[str]] = []
    seqs = []
    binary = False
    with store.txn() as txn:
        for moment in (a, b):
            point = resolve(store, txn, moment, now_ns)
            seqs.append(point.seq)
            view = View(store, txn, point.seq)
            try:
                ino = view.resolve(rel)
            except CdpfsError:
                texts.append([])  # not there then
                continue
            node = view.inode(ino)
            if node is None or not node.is_reg:
                raise CdpfsError(f"{rel}: not a file at #{point.seq}")
            if node.size > MAX_DIFF:
                raise CdpfsError(f"{rel}: {node.size} bytes at #{point.seq}; the diff "
                                 f"compares files of {MAX_DIFF} bytes at most")
            data = view.read(ino, 0, node.size, node.size)
            try:
                texts.append(data.decode("utf-8").splitlines(keepends=True))
            except UnicodeDecodeError:
                binary = True
                texts.append([])
    lines = [] if binary else list(difflib.unified_diff(
        texts[0], texts[1], f"{rel}@#{seqs[0]}", f"{rel}@#{seqs[1]}"))
    return {"path": rel, "a": seqs[0], "b": seqs[1], "binary": binary,
            "diff": "".join(lines)}


def changes(store: Store, a: str, b: str, path: str = "",
            now_ns: int | None = None) -> dict[str, Any]:
    """What changed under ``path`` between moments ``a`` and ``b`` (``cdpfs diff
    --json``'s document)."""
    rel = _rel(path)
    with store.txn() as txn:
        seq1 = resolve(store, txn, a, now_ns).seq
        seq2 = resolve(store, txn, b, now_ns).seq
        found = diff(store, txn, seq1, seq2, rel)
    return changes_document(seq1, seq2, found)


def space(store: Store) -> dict[str, Any]:
    """Where the store's bytes go (``cdpfs stat --json``'s document; a scan of every
    block's size)."""
    return space_document(space_stats(store))


def timeline(store: Store, now_ns: int, seconds: float, buckets: int = 60) -> dict[str, Any]:
    """Records written per interval over the last ``seconds``, and the marks on that
    stretch: bookmarks, the last DR test, the last backup."""
    start = now_ns - int(seconds * 1e9)
    width = max(1, int(seconds * 1e9) // buckets)
    counts = [0] * buckets
    scanned = 0
    with store.txn() as txn:
        first = journal.seq_at(store, txn, start) + 1
        for _seq, raw in journal.packed(store, txn, first):
            ts = journal.ts_of(raw)
            index = (ts - start) // width
            if 0 <= index < buckets:
                counts[index] += 1
            scanned += 1
            if scanned == MAX_SCAN:
                break
        marks = [{"kind": "bookmark", "name": b.name, "seq": b.seq,
                  "time_ns": journal.ts(store, txn, b.seq)}
                 for b in bookmarks.bookmarks(store, txn)]
    tested = last_test(store)
    if tested is not None:
        marks.append({"kind": "drtest-passed" if tested.ok else "drtest-failed",
                      "seq": tested.seq, "time_ns": tested.ts})
    made = schedule(store).last
    if made is not None:
        marks.append({"kind": "backup-failed" if made.failed else "backup-done",
                      "seq": made.seq, "time_ns": made.made_at})
    marks = [m for m in marks if m["time_ns"] and m["time_ns"] >= start]
    return {"start_ns": start, "end_ns": now_ns, "bucket_seconds": width / 1e9,
            "writes": counts, "complete": scanned < MAX_SCAN,
            "marks": sorted(marks, key=lambda m: m["time_ns"])}
