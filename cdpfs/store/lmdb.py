"""The store directory: one LMDB environment, its sub-databases and the meta table.

A store is a directory holding ``data.mdb``/``lock.mdb`` (LMDB) and ``cdpfs.lock``
(the writer lock that keeps a second writer out, ``lock.py``). This module opens
and creates stores, grows the LMDB map, begins and ends transactions and reads
the meta table. The other tables are read and written only through the modules
of this package named for what they hold (``journal``, ``versions``, ``blocks``,
``bookmarks``, ``replicas``, ``entries``; ``view`` reads the volume as of a seq):
no module outside ``cdpfs/store/`` touches a table handle (``Store.db``).

A *clone* is a store whose meta names a base store and a point of it
(``clone.base``, ``clone.seq``): what the clone's own tables do not hold is read
from the base as of that point (``Base``; ``view.View`` falls through to it),
and its blocks and packs likewise (``blocks``). The base keeps the point from pruning with a
hold (``history.clones``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from .. import system
from ..errors import Corrupt, StoreError
from . import codec, journal
from .lock import LOCK_NAME, Holder, WriterLock, holder
from .schema import U64

log = logging.getLogger(__name__)

FORMAT = b"cdpfs-2"  # 2: inodes count their data blocks
DEFAULT_BLOCK_SIZE = 128 * 1024
MIN_MAP = 1 << 30
DB_NAMES = (
    b"meta", b"blocks", b"journal", b"timeidx",
    b"inodes", b"dirents", b"extents", b"xattrs", b"orphans", b"packs",
    b"bookmarks", b"replicas",  # used by time travel and replication
)
_CREATING = ".creating-"  # prefix of the directory a new store is made in
_ALLOWED_BEFORE = {"tls", "cdpfs.log", "replica.log", LOCK_NAME}  # may predate the store


class BlockCache:
    """A small LRU of verified, decompressed blocks keyed by hash, shared by the
    threads that read (a lock keeps its order consistent)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def has(self, key: bytes) -> bool:
        return key in self._items

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)


def is_store(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def _look_up(path: Path) -> bool:
    """Whether ``path`` exists (following links); False if it is missing, StoreError
    with the reason if it cannot be looked up (a link to nothing or a loop of links,
    too long, not searchable) or is not valid UTF-8 (a store's path is written in
    its clones, its lock and its mounts)."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise StoreError(f"{path}: a store's path must be valid UTF-8") from None
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise StoreError(f"{path}: a symbolic link to nothing "
                             f"({os.readlink(path)})") from None
        return False
    except NotADirectoryError:
        return False
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None
    return True


class CloneOf(NamedTuple):
    """What a clone's meta says of its base: the store's path and volume id, the
    point read through to, the first pack number that is the clone's own, the
    check of the base's record at the point (``journal.check``: the base must
    still hold the same history there) and the name of the hold that keeps the
    point in the base (clones made before these two were kept have them empty)."""

    path: Path
    uuid: str
    seq: int
    pack_start: int
    check: bytes = b""
    hold: str = ""


class Base(NamedTuple):
    """What a clone reads through to: the base store (open read-only) as of ``seq``.
    Packs numbered below ``pack_start`` are the base's; the clone's own start there.
    ``shared``: the base was open in this process already (LMDB allows one
    environment per file in a process), and stays open when the clone closes."""

    store: Store
    seq: int
    pack_start: int
    shared: bool = False


_open_stores: weakref.WeakValueDictionary[Path, Store] = weakref.WeakValueDictionary()


class Store:
    """An open store: the LMDB environment, its named databases and the block cache.

    Attributes:
        path: the store directory.
        env: the LMDB environment.
        db: the named sub-databases by name (``db["inodes"]`` ...), for the modules
            of this package only.
        block_size: the logical block size fixed when the store was created.
        readonly: opened without write access.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 open_base: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not _look_up(self.path) or not self.path.is_dir():
            raise StoreError(f"{self.path}: no such store directory")
        if not is_store(self.path):
            raise StoreError(f"{self.path}: not a cdpfs store (run 'cdpfs init {self.path}')")
        self.writer = WriterLock(self.path)
        size = check_file(self.path / "data.mdb")
        self.env = self._open_env(max(MIN_MAP, _round_up(size * 2)))
        _open_stores[self.path.resolve()] = self
        try:
            self.db = {name.decode(): self.env.open_db(name, create=not readonly)
                       for name in DB_NAMES}
        except lmdb.Error as exc:
            self.env.close()
            raise StoreError(f"{self.path}: store is damaged or of another version "
                             f"(a table is missing: {exc})") from None
        with self.env.begin() as txn:
            fmt = txn.get(b"format", db=self.db["meta"])
            if fmt != FORMAT:
                self.env.close()
                raise StoreError(f"{self.path}: unsupported store format {fmt!r} (want {FORMAT!r})")
            self.block_size = int(txn.get(b"block_size", db=self.db["meta"]))
            self.uuid = txn.get(b"uuid", db=self.db["meta"]).decode()
            raw = txn.get(b"clone", db=self.db["meta"])
        self.clone_of = None if raw is None else _decode_clone(raw)
        self.cache = BlockCache()
        self._active = 0  # transactions begun by txn() and not yet ended
        self._cond = threading.Condition()
        self._under: dict[int, lmdb.Transaction] = {}  # id(txn) -> the base's, for a clone
        self.base: Base | None = None
        if self.clone_of is not None and open_base:
            try:
                self.base = self._open_base(self.clone_of)
            except BaseException:
                self.env.close()
                raise
        # The pack the writer is filling: in memory until sealed, which happens
        # before every commit, so no committed extent ever points into it.
        self.open_pack: tuple[int, bytearray] = (0, bytearray())

    def _open_base(self, clone: CloneOf) -> Base:
        base = _open_stores.get(clone.path.resolve())
        if base is not None:
            return Base(base, clone.seq, clone.pack_start, shared=True)
        try:
            base = Store(clone.path, readonly=True)
        except StoreError as exc:
            raise StoreError(f"{self.path}: a clone of {clone.path} at #{clone.seq}, whose "
                             f"base cannot be opened: {exc}") from None
        try:
            if base.uuid != clone.uuid:
                raise StoreError(f"{self.path}: a clone of {clone.path}, which now holds "
                                 "another volume")
            with base.txn() as txn:
                check = journal.check(base, txn, clone.seq)
            if not check:
                raise StoreError(f"{self.path}: a clone of {clone.path} at #{clone.seq}, "
                                 "which that store no longer has")
            if clone.check and check != clone.check:
                raise StoreError(f"{self.path}: a clone of {clone.path} at #{clone.seq}, "
                                 "where that store now holds another history (it was failed "
                                 "back or replaced since); the clone is not opened so that it "
                                 "never shows another state than the one it was made of")
        except BaseException:
            base.close()
            raise
        return Base(base, clone.seq, clone.pack_start)

    def after_last(self, txn: lmdb.Transaction, table: str) -> int:
        """One more than the number the last key of ``table`` starts with (0 if empty)."""
        cur = txn.cursor(db=self.db[table])
        return U64.unpack(bytes(cur.key()[:8]))[0] + 1 if cur.last() else 0

    def under(self, txn: lmdb.Transaction) -> lmdb.Transaction:
        """A clone's read transaction of its base, paired with ``txn`` (begun with
        its first use, ended with ``txn`` by ``end``)."""
        assert self.base is not None and self.clone_of is not None
        under = self._under.get(id(txn))
        if under is None:
            under = self.base.store.begin()
            # The base must still hold the history the clone was made of (it may have
            # been failed back or replaced while the clone is open): a clone never
            # shows another state than its own.
            if self.clone_of.check and \
                    journal.check(self.base.store, under, self.base.seq) != self.clone_of.check:
                self.base.store.end(under)
                raise Corrupt(self.clone_of.check, f"{self.path}: its base "
                              f"{self.base.store.path} no longer holds the history the clone "
                              f"was made of at #{self.base.seq}")
            self._under[id(txn)] = under
        return under

    def _open_env(self, map_size: int) -> lmdb.Environment:
        try:
            return lmdb.open(
                str(self.path), map_size=map_size, max_dbs=len(DB_NAMES) + 2,
                readonly=self.readonly, max_readers=256, readahead=True,
                metasync=True, sync=True, lock=True,
            )
        except lmdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open store: {exc}") from exc

    # --- creation ------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, block_size: int = DEFAULT_BLOCK_SIZE,
               volume_uuid: str | None = None) -> Store:
        """Create the LMDB environment of a new store at ``path`` (missing or empty dir;
        a TLS identity made beforehand may be there).

        The volume inside is made by ``fs.mutate.init_volume``, which calls this; a
        replica store takes the primary's ``volume_uuid``.
        """
        p = Path(path)
        if _look_up(p) and not p.is_dir():
            raise StoreError(f"{p}: exists and is not a directory")
        if p.is_dir() and is_store(p):
            raise StoreError(f"{p}: is already a cdpfs store")
        if p.is_dir() and any(e.name not in _ALLOWED_BEFORE and not e.name.startswith(_CREATING)
                              for e in p.iterdir()):
            raise StoreError(f"{p}: directory is not empty and is not a cdpfs store")
        if block_size < 4096 or block_size & (block_size - 1) or block_size > codec.MAX_PLAIN:
            raise StoreError(f"block size {block_size} must be a power of two from 4096 to "
                             f"{codec.MAX_PLAIN}")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{exc.filename or p}: cannot make the store directory: "
                             f"{exc.strerror}") from None
        for left in p.glob(_CREATING + "*"):  # from a creation cut short
            shutil.rmtree(left)
        # Made aside and moved in whole: a reader never sees a store without its tables.
        tmp = Path(tempfile.mkdtemp(prefix=_CREATING, dir=p))
        try:
            env = lmdb.open(str(tmp), map_size=MIN_MAP, max_dbs=len(DB_NAMES) + 2)
            try:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name, txn=txn) for name in DB_NAMES}
                    meta = dbs[b"meta"]
                    txn.put(b"format", FORMAT, db=meta)
                    txn.put(b"uuid", (volume_uuid or str(uuid.uuid4())).encode(), db=meta)
                    txn.put(b"block_size", str(block_size).encode(), db=meta)
                    txn.put(b"created_ns", str(time.time_ns()).encode(), db=meta)
            finally:
                env.close()
            os.rename(tmp / "data.mdb", p / "data.mdb")
            system.fsync_dir(p)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(p)

    # --- locking and map size -------------------------------------------------

    def lock(self, owner: str) -> None:
        """Take the exclusive writer lock, or say who holds it (StoreLocked)."""
        self.writer.acquire(owner)

    def holder(self) -> Holder | None:
        """Who holds the writer lock now (None when nobody does)."""
        return holder(self.path)

    def unlock(self) -> None:
        self.writer.release()

    def used_bytes(self) -> int:
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def reusable_bytes(self, txn: lmdb.Transaction) -> int:
        """Bytes of data.mdb that no table uses as ``txn`` sees them: pages freed by
        earlier commits (a prune, deletions), which LMDB fills again before it grows
        the file. The file's pages less the tables' (the free list's own few pages
        count as free), so space the disk does not show is still there to write."""
        main = self.env.stat()
        used = 2 + _pages(main)  # the two meta pages, the table of tables
        for db in self.db.values():
            used += _pages(txn.stat(db))
        try:
            size = (self.path / "data.mdb").stat().st_size
        except OSError:
            return 0
        return max(0, size // main["psize"] - used) * main["psize"]

    def grow_if_needed(self, headroom: int) -> None:
        """Double the map while less than ``headroom`` bytes are left (no txn open)."""
        size = self.env.info()["map_size"]
        new = size
        while new - self.used_bytes() < headroom or self.used_bytes() > new * 0.6:
            new *= 2
        if new != size:
            log.info("growing LMDB map of %s from %d to %d MiB", self.path, size >> 20, new >> 20)
            with self._cond:  # LMDB: only while this process has no transaction open
                self._cond.wait_for(lambda: self._active == 0)
                self.env.set_mapsize(new)

    @contextmanager
    def txn(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction (``begin`` and ``end``), committed on success."""
        txn = self.begin(write)
        try:
            yield txn
        except BaseException:
            self.end(txn)
            raise
        self.end(txn, commit=True)

    def begin(self, write: bool = False) -> lmdb.Transaction:
        """Begin a transaction (end it with ``end``). Another process (a running
        mount) may have grown the LMDB map: then adopt the new size and retry
        (LMDB allows it only while this process has no transaction open, so
        transactions begun here are counted)."""
        while True:
            with self._cond:
                self._active += 1
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:
                with self._cond:
                    self._active -= 1
                    self._cond.wait_for(lambda: self._active == 0)
                    self.env.set_mapsize(0)
                    self._cond.notify_all()
            except BaseException:
                self._end_txn()
                raise

    def end(self, txn: lmdb.Transaction, commit: bool = False) -> None:
        """Commit (``commit``) or abort a transaction from ``begin``."""
        under = self._under.pop(id(txn), None) if self._under else None
        if under is not None:
            assert self.base is not None
            self.base.store.end(under)
        try:
            if commit:
                txn.commit()
            else:
                txn.abort()
        finally:
            self._end_txn()

    def _end_txn(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    # --- the meta table: identity, counters, settings -------------------------------

    def meta(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        """The meta table's value of ``key`` (None if unset)."""
        return txn.get(key, db=self.db["meta"])

    def set_meta(self, txn: lmdb.Transaction, key: bytes, value: bytes | None) -> None:
        """Set (None: delete) the meta table's ``key``."""
        if value is None:
            txn.delete(key, db=self.db["meta"])
        else:
            txn.put(key, value, db=self.db["meta"])

    def meta_items(self, txn: lmdb.Transaction, prefix: bytes) -> dict[bytes, bytes]:
        """The meta table's entries whose keys start with ``prefix``."""
        cur = txn.cursor(db=self.db["meta"])
        out: dict[bytes, bytes] = {}
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                out[bytes(key)] = bytes(value)
        return out

    def config(self, txn: lmdb.Transaction, name: str) -> Any:
        """A setting stored in the meta table as JSON (None if unset)."""
        raw = txn.get(b"config." + name.encode(), db=self.db["meta"])
        return None if raw is None else json.loads(raw)

    def set_config(self, txn: lmdb.Transaction, name: str, value: Any) -> None:
        txn.put(b"config." + name.encode(), json.dumps(value).encode(), db=self.db["meta"])

    def orphans(self, txn: lmdb.Transaction) -> list[int]:
        """Inodes unlinked while still open (the ``orphans`` table): freed on the next
        mount if a crash came first."""
        cur = txn.cursor(db=self.db["orphans"])
        return [U64.unpack(k)[0] for k in cur.iternext(values=False)]

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def last_txnid(self) -> int:
        """The newest committed transaction's id: moves with every commit of any process."""
        return int(self.env.info()["last_txnid"])

    def copy(self, dest: Path) -> None:
        """A compacted copy of the whole environment into the directory ``dest``."""
        self.env.copy(str(dest), compact=True)

    def disk_free(self) -> int:
        return system.disk_free(self.path)

    def close(self) -> None:
        self.env.close()
        _open_stores.pop(self.path.resolve(), None)
        if self.base is not None and not self.base.shared:
            self.base.store.close()
        self.unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def volume_id(path: Path) -> str:
    """The volume id (uuid) of the store at ``path`` (StoreError if there is none)."""
    with Store(path, readonly=True) as store:
        return store.uuid


def encode_clone(clone: CloneOf) -> bytes:
    """The meta value ``clone`` of a clone store."""
    return json.dumps({"base": str(clone.path), "uuid": clone.uuid, "seq": clone.seq,
                       "pack_start": clone.pack_start, "check": clone.check.hex(),
                       "hold": clone.hold}).encode()


def _decode_clone(raw: bytes) -> CloneOf:
    value = json.loads(raw)
    return CloneOf(Path(value["base"]), value["uuid"], int(value["seq"]),
                   int(value["pack_start"]), bytes.fromhex(value.get("check", "")),
                   str(value.get("hold", "")))


_MAGIC, _VERSION = 0xBEEFC0DE, 1  # LMDB's meta page magic and data format version
_META = struct.Struct("<II")  # magic, version at offset 16 of a meta page
_PSIZE = struct.Struct("<I")  # the page size, at offset 40 (the free DB's md_pad)
_POS = struct.Struct("<QQ")  # last page, transaction id at offset 136


def check_file(path: Path) -> int:
    """The size of the LMDB file ``path``, after checking what LMDB would only find
    out by crashing: a file that is not LMDB's (zeroed, foreign), of another LMDB
    format, or shorter than its newest meta page says (truncated: mapping it
    would end in SIGBUS). StoreError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(2 * 65536)
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror}") from None
    metas = []
    psize = _PSIZE.unpack_from(head, 40)[0] if len(head) >= 44 else 0
    for base in (0, psize):
        if psize < 512 or psize & (psize - 1) or base + 152 > len(head):
            break
        magic, version = _META.unpack_from(head, base + 16)
        if magic != _MAGIC:
            continue
        if version != _VERSION:
            raise StoreError(f"{path}: an LMDB file of data format {version}, not "
                             f"{_VERSION}: of another version")
        metas.append(_POS.unpack_from(head, base + 136))
    if not metas:
        raise StoreError(f"{path}: not an LMDB file ({size} bytes, no valid header: "
                         "zeroed, truncated or another kind of file); the store is damaged")
    last_page, _txnid = max(metas, key=lambda m: m[1])
    needed = (last_page + 1) * psize
    if size < needed:
        raise StoreError(f"{path}: truncated: {size} bytes, but its data runs to "
                         f"{needed} bytes; the store is damaged")
    return size


def _pages(stat: dict[str, int]) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def _round_up(n: int) -> int:

    size = MIN_MAP
    while size < n:
        size *= 2
    return size
