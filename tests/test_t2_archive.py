"""``cdpfs export`` and ``cdpfs import`` as a user runs them: the real command line on
stores made in this process (no FUSE), every bad input one line and exit status 1.

An export refuses an existing file without ``--force``, a moment that retention
thinned or prune removed, a path that leaves the volume or does not exist then,
and a damaged store; a killed export leaves no archive under its name (only a
temporary file beside it, which the next export removes), a stopped one not even
that. An import refuses archives whose names escape the root, truncated and
garbage archives, and a target in the way, leaving no store behind.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest
from harness import CLI, cdpfs, wait_until

from cdpfs.history import bookmarks
from cdpfs.store import codec
from cdpfs.store.lmdb import Store
from cdpfs.store.view import open_view
from cdpfs.testing import LiveStore

MIB = 1 << 20
S = 10**9


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdpfs: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def write(live: LiveStore, name: bytes, data: bytes) -> None:
    ino = live(lambda: live.fs.view.lookup(1, name))
    if ino is None:
        fh, _ = live.create(name)
    else:
        fh = live(live.fs.open, ino, os.O_RDWR | os.O_TRUNC)
    for off in range(0, len(data), 8 * MIB):
        live(live.fs.write, fh, off, data[off:off + 8 * MIB])
    live(live.fs.release, fh)


def members(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out[m.name] = f.read() if f is not None else b""
    return out


def holds(store: Path) -> list[str]:
    with Store(store) as st, st.txn() as txn:
        return [b.name for b in bookmarks.all_points(st, txn) if b.is_hold]


def leftovers(where: Path) -> list[str]:
    return sorted(n for n in os.listdir(where) if ".export-" in n or ".import-" in n)


@pytest.fixture
def two_states(tmp_path: Path) -> tuple[Path, int]:
    """A store whose file ``f`` read b"one" at the seq returned, b"two" now, with a
    directory ``d`` holding ``g`` and a symlink ``l`` to it."""
    store = tmp_path / "vol.store"
    with LiveStore(store) as live:
        write(live, b"f", b"one")
        d = live(live.fs.mknod, 1, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
        fh, _ = live.create(b"g", parent=d)
        live(live.fs.release, fh)
        live(live.fs.mknod, 1, b"l", stat.S_IFLNK | 0o777, 0, 0, 0, b"d")
        live.sync()
        first = live.seq()
        write(live, b"f", b"two")
        live.sync()
    return store, first


def test_export_to_a_file_and_a_pipe_and_what_it_refuses(two_states: tuple[Path, int],
                                                         tmp_path: Path) -> None:
    store, first = two_states
    out = tmp_path / "out.tar"
    said = cdpfs("export", store, "--at", f"#{first}", "-o", out).stdout
    assert said.startswith(f"exported #{first} (") and "to " in said
    assert members(out.read_bytes())["f"] == b"one"
    before = out.read_bytes()
    one_line_error(cdpfs("export", store, "--at", "now", "-o", out, check=False),
                   "exists (--force replaces it)")
    assert out.read_bytes() == before
    cdpfs("export", store, "--at", "now", "-o", out, "--force")
    assert members(out.read_bytes())["f"] == b"two"
    # to standard output: the same bytes, the summary on stderr
    piped = subprocess.run([*CLI, "export", str(store), "--at", f"#{first}", "-o", "-"],
                           capture_output=True, timeout=60, check=True)
    assert piped.stdout == before and b"exported" in piped.stderr
    # subtrees only
    cdpfs("export", store, "--at", "now", "d", "-o", tmp_path / "d.tar")
    assert list(members((tmp_path / "d.tar").read_bytes())) == ["d", "d/g"]
    bad = tmp_path / "bad.tar"
    for args, words in (
            (["--at", "#999"], ["no record #999"]),
            (["--at", "no-such-mark"], ["no such bookmark"]),
            (["--at", "2001-01-01"], ["did not exist yet"]),
            (["--at", ""], ["empty moment"]),
            (["--at", "now", ".."], ["..: leads out of the volume"]),
            (["--at", "now", "d/../../etc"], ["leads out of the volume"]),
            (["--at", "now", "/../x"], ["leads out of the volume"]),
            (["--at", f"#{first}", "nothing"], ["nothing: no such file or directory"]),
            (["--at", "now", "l/g"], ["is a symbolic link"]),
            (["--at", "now", "f/x"], ["not a directory"])):
        one_line_error(cdpfs("export", store, *args, "-o", bad, check=False), *words)
    assert not bad.exists() and not leftovers(tmp_path)
    one_line_error(cdpfs("export", store, "--at", "now", "-o", tmp_path, "--force",
                         check=False), "is a directory")
    one_line_error(cdpfs("export", store, "--at", "now", "-o", tmp_path / "no" / "x.tar",
                         check=False), "no such directory")
    one_line_error(cdpfs("export", tmp_path / "nope", "--at", "now", "-o", bad, check=False),
                   "no such file or directory")
    assert holds(store) == []  # every export let its moment go


def test_a_moment_retention_thinned_or_prune_removed_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "old.store"
    with LiveStore(store) as live:
        stamps = []
        while len(stamps) < 2 or stamps[-1][1] // (60 * S) != stamps[-2][1] // (60 * S):
            write(live, b"f", b"version %d" % len(stamps))  # two in one minute
            live.sync()
            stamps.append((live.seq(), live(lambda: live.fs.m.last_ts)))
    (first, _), (last, _) = stamps[-2:]
    # every write kept for a second, then one point a minute: the first of the two goes
    cdpfs("retention", store, "--keep-all", "1s", "--minutely", "1h")
    time.sleep(1.5)
    out = tmp_path / "x.tar"
    one_line_error(cdpfs("export", store, "--at", f"#{first}", "-o", out, check=False),
                   f"record #{first} is not kept by retention")
    cdpfs("prune", store)
    one_line_error(cdpfs("export", store, "--at", f"#{first}", "-o", out, check=False),
                   "not kept")
    assert not out.exists()
    cdpfs("export", store, "--at", f"#{last}", "-o", out)
    assert members(out.read_bytes())["f"] == b"version %d" % (len(stamps) - 1)


def test_a_damaged_store_ends_the_export_with_one_line_and_no_archive(tmp_path: Path) -> None:
    store = tmp_path / "vol.store"
    content = random.Random(1).randbytes(8 * MIB)
    with LiveStore(store) as live:
        write(live, b"big", content)
        live.sync()
    key = codec.digest(content[5 * MIB: 5 * MIB + 128 * 1024])
    env = lmdb.open(str(store), map_size=1 << 30, max_dbs=32)
    try:
        db = env.open_db(b"blocks", create=False)
        with env.begin(write=True) as txn:
            value = bytearray(txn.get(key, db=db))
            value[len(value) // 2] ^= 0xFF
            txn.put(key, bytes(value), db=db)
    finally:
        env.close()
    out = tmp_path / "x.tar"
    one_line_error(cdpfs("export", store, "--at", "now", "-o", out, check=False),
                   "corrupt", "file block 40")
    assert not out.exists() and not leftovers(tmp_path)
    piped = subprocess.run([*CLI, "export", str(store), "--at", "now", "-o", "-"],
                           capture_output=True, timeout=60)
    assert piped.returncode == 1 and piped.stderr.count(b"\n") == 1
    assert content[:5 * MIB] in piped.stdout and content[5 * MIB:5 * MIB + 4096] \
        not in piped.stdout
    with pytest.raises(tarfile.ReadError):  # short: a reader sees it is incomplete
        members(piped.stdout)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with 320 MiB of incompressible data: an export takes a while."""
    store = tmp_path_factory.mktemp("big") / "big.store"
    rng = random.Random(7)
    with LiveStore(store) as live:
        for i in range(5):
            write(live, b"f%d" % i, rng.randbytes(64 * MIB))
        live.sync()
    return store


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_export_leaves_no_archive_under_its_name(big_store: Path, tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    out = tmp_path / "out.tar"
    proc = subprocess.Popen([*CLI, "export", str(big_store), "--at", "now", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = tmp_path / f".out.tar.export-{proc.pid}.tmp"
    try:
        wait_until(lambda: tmp.exists() and tmp.stat().st_size > 8 * MIB, timeout=60,
                   what="the export to be under way")
        proc.send_signal(signal.SIGSTOP)
        assert not out.exists()
        assert any(h.startswith(f".hold.{proc.pid}.") for h in holds(big_store))
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and tmp.exists()  # left beside, named
    else:  # stopped as an error: one line, nothing left, the hold let go
        assert proc.returncode == 1 and err.decode().strip() == \
            "cdpfs: error: stopped by SIGTERM", err
        assert not tmp.exists()
        assert not any(h.startswith(f".hold.{proc.pid}.") for h in holds(big_store))
    cdpfs("export", big_store, "--at", "now", "-o", out)  # clears what the dead one left
    assert leftovers(tmp_path) == []
    with tarfile.open(out) as tar:
        assert [m.size for m in tar] == [0] + [64 * MIB] * 5


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_progress_is_json_lines_on_stderr_with_json_and_nothing_on_a_pipe(
        big_store: Path, two_states: tuple[Path, int], tmp_path: Path) -> None:
    out = tmp_path / "out.tar"
    proc = cdpfs("export", big_store, "--at", "now", "-o", out, "--progress", "json")
    said = json_lines(proc.stderr)  # every line of stderr is JSON
    assert said[-1]["done"] is True and said[-1]["op"] == "export"
    assert said[-1]["bytes"] == said[-1]["total"] == 5 * 64 * MIB
    assert not any("done" in line for line in said[:-1])
    assert [line["bytes"] for line in said] == sorted(line["bytes"] for line in said)
    assert proc.stdout.startswith("exported #")
    with tarfile.open(out) as tar:
        assert [m.size for m in tar] == [0] + [64 * MIB] * 5
    # to standard output: the archive as without progress; the summary follows the JSON
    store, first = two_states
    plain = subprocess.run([*CLI, "export", str(store), "--at", f"#{first}", "-o", "-"],
                           capture_output=True, timeout=60, check=True)
    piped = subprocess.run([*CLI, "export", str(store), "--at", f"#{first}", "-o", "-",
                            "--progress", "json"], capture_output=True, timeout=60, check=True)
    assert piped.stdout == plain.stdout and members(piped.stdout)["f"] == b"one"
    *progress, summary = piped.stderr.decode().splitlines()
    last = json_lines("\n".join(progress))[-1]
    assert summary.startswith("exported #") and last["done"] is True
    assert last["bytes"] == last["total"] == 3  # f: b"one"
    # auto on a pipe, and none: nothing on stderr
    for mode in ("auto", "none"):
        quiet = cdpfs("export", store, "--at", "now", "-o", out, "--force", "--progress", mode)
        assert quiet.stderr == "" and quiet.stdout.startswith("exported #")
    # an import says how much file data it wrote, and the archive's tree is made
    made = cdpfs("import", out, tmp_path / "new.store", "--progress", "json")
    assert json_lines(made.stderr)[-1]["done"] is True
    assert json_lines(made.stderr)[-1]["bytes"] == 3
    assert cdpfs("import", out, tmp_path / "other.store").stderr == ""
    with Store(tmp_path / "new.store") as st, open_view(st) as view:
        assert view.read_file("f") == b"two"


def tar_of(*names: tuple[str, bytes, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in names:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return out.getvalue()


@pytest.mark.parametrize(("names", "words"), [
    ([("../evil", tarfile.REGTYPE, "")], ["../evil: a name with '..'"]),
    ([("/etc/cron.d/x", tarfile.REGTYPE, "")], ["/etc/cron.d/x: an absolute name"]),
    ([("l", tarfile.SYMTYPE, "/etc"), ("l/passwd", tarfile.REGTYPE, "")],
     ["goes through the symbolic link l"]),
    ([("h", tarfile.LNKTYPE, "../../etc/shadow")], ["a hard link target with '..'"]),
])
def test_import_refuses_names_that_escape_the_root(tmp_path: Path,
                                                   names: list[tuple[str, bytes, str]],
                                                   words: list[str]) -> None:
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_of(*names))
    one_line_error(cdpfs("import", archive, tmp_path / "new.store", check=False), *words)
    assert sorted(os.listdir(tmp_path)) == ["evil.tar"]


def test_import_refuses_truncated_and_garbage_archives(tmp_path: Path) -> None:
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data")
        info.size = 3 * MIB
        tar.addfile(info, io.BytesIO(bytes(range(256)) * (3 * MIB // 256)))
    data = good.getvalue()
    cases = {"cut.tar": (data[:2 * MIB], "truncated or damaged"),
             "nomarker.tar": (data[:512 + 3 * MIB], "truncated or damaged"),
             "garbage.tar": (random.Random(3).randbytes(4096), "not a tar archive"),
             "empty.tar": (b"", "not a tar archive")}
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        one_line_error(cdpfs("import", tmp_path / name, tmp_path / "new.store", check=False),
                       name, words)
    proc = subprocess.run([*CLI, "import", "-", str(tmp_path / "new.store")], input=data[:MIB],
                          capture_output=True, timeout=60)
    assert proc.returncode == 1 and b"standard input: data: the archive is truncated" \
        in proc.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(cases)
    # the whole archive, from standard input
    proc = subprocess.run([*CLI, "import", "-", str(tmp_path / "new.store")], input=data,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and b"imported - into" in proc.stdout, proc.stderr
    with Store(tmp_path / "new.store") as st, open_view(st) as view:
        assert view.read_file("data") == bytes(range(256)) * (3 * MIB // 256)
    one_line_error(cdpfs("import", tmp_path / "cut.tar", tmp_path / "new.store", check=False),
                   "is a cdpfs store already")
    one_line_error(cdpfs("import", tmp_path / "missing.tar", tmp_path / "other", check=False),
                   "missing.tar: No such file or directory")
    one_line_error(cdpfs("import", tmp_path, tmp_path / "other", check=False),
                   "is a directory")
