"""The command line on bad input: one clear line on stderr, exit status 1, nothing changed."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import cdpfs, force_unmount


def _one_line_error(proc, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdpfs: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_init_status_verify(tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert "initialised" in cdpfs("init", store).stdout
    out = cdpfs("status", store).stdout
    assert "1 records" in out and "in use       no" in out
    assert cdpfs("verify", store).stdout.strip().endswith(": ok")


def test_bad_paths(tmp_path: Path) -> None:
    _one_line_error(cdpfs("status", tmp_path / "nope", check=False), "no such store")
    _one_line_error(cdpfs("verify", tmp_path, check=False), "not a cdpfs store")
    _one_line_error(cdpfs("umount", tmp_path, check=False), "no cdpfs volume is mounted")
    (tmp_path / "file").write_text("x")
    _one_line_error(cdpfs("init", tmp_path / "file", check=False), "not a directory")
    _one_line_error(cdpfs("init", tmp_path / "s", "--block-size", "1000", check=False),
                    "power of two")
    assert (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


# --- no traceback, ever ---------------------------------------------------------------------

BAD_MOMENTS = ["", "@", "2026-12-01T10:00+25:00", "2026-12-01T10:00-99:99", "2026-13-45",
               "#-1", "#" + "9" * 30, "-1y", "now ", "9999-12-31T23:59:59Z", "x" * 5000, "é@/"]


def _stores(base: Path) -> dict[str, Path]:
    """Every kind of STORE argument: good, missing, a file, an empty directory, and
    damaged ones (truncated, zeroed, a foreign LMDB file)."""
    import shutil

    import lmdb

    good = base / "good"
    cdpfs("init", good)
    out = {"good": good, "missing": base / "missing", "file": base / "plain",
           "empty": base / "emptydir"}
    out["file"].write_text("not a store")
    out["empty"].mkdir()
    (base / "busy").mkdir()  # a mount point with a file in it: never mounted on
    (base / "busy" / "mine").write_text("x")
    for name, damage in (("truncated", lambda p: os.truncate(p, 12288)),
                         ("zeroed", lambda p: p.write_bytes(bytes(p.stat().st_size)))):

        shutil.copytree(good, base / name)
        damage(base / name / "data.mdb")
        out[name] = base / name
    foreign = base / "foreign"
    env = lmdb.open(str(foreign), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    out["foreign"] = foreign
    return out


def _commands(s: dict[str, Path], base: Path) -> list[list[str]]:
    good = s["good"]
    cmds: list[list[str]] = [[], ["--nope"], ["nosuchcommand"], ["-vvvv", "status"]]
    for st in s.values():  # every kind of store, good and damaged
        cmds += [["status", st], ["verify", st], ["stat", st], ["prune", st],
                 ["retention", st], ["config", st], ["bookmarks", "--volume", st],
                 ["bookmark", "b", "--volume", st],
                 ["log", "f", "--store", st], ["diff", "#1", "now", "--store", st],
                 ["assess", st], ["mount", st, s["file"].parent / "busy"],
                 ["replica", "add", st, "r1", "--address", "h:1"],
                 ["replicate", st, "--to", "127.0.0.1:1", "--name", "r1", "--attempts", "1"],
                 ["verify", "--compare", st, good], ["init", st]]
    cmds += [["retention", good, "--keep-all", "forever"], ["retention", good, "--daily", "1s"],
             ["retention", good, "--replica-max-lag", "-5"], ["df", good],
             ["config", good, "history"], ["config", good, "history=maybe"],
             ["config", good, "=x"], ["config", good, "history=visible", "history=hidden"],
             ["bookmark", "--delete", "nosuch", "--volume", good],
             ["bookmark", "@bad", "--volume", good],
             ["diff", "#1", "now", "no/such", "--store", good],
             ["assess", good, "--since", "-1h"], ["assess", good, "--lag", "soon"],
             ["replica", "add", good, "r1", "--address", "nowhere"],
             ["replica", "add", good, "r1", "--address", "h:1", "--limit", "fast"],
             ["replica", "keygen", s["file"]], ["replica", "trust", good, s["file"], "--name", "x"],
             ["replica", "serve", good, "--listen", "0.0.0.0:99999"],
             ["replica", "serve", s["empty"], "--listen", "127.0.0.1:1"],
             ["mount", good, base / "no-such-mountpoint"], ["mount", good, s["file"]],
             ["umount", good], ["rewind", good, "--at", "#1", "--yes"],
             ["restore", good / "x", "--at", "#1"], ["verify", "--compare", good],
             ["verify", good, "--at", "3"], ["init", good, "--block-size", "12345"]]
    cmds += [["init", base / "new", "--block-size", n] for n in ("0", "-4096", "1" * 40, "x")]
    for moment in BAD_MOMENTS:
        cmds += [["log", "f", "--store", good, "--at", moment],
                 ["diff", moment, "now", "--store", good],
                 ["bookmark", "b", "--at", moment, "--volume", good],
                 ["mount", "--at", moment, good, base / "busy"]]
    return [[str(a) for a in c] for c in cmds]


def test_no_command_prints_a_traceback(tmp_path: Path) -> None:
    """Every command with missing, malformed and hostile arguments and damaged
    stores: exit 0, 1 (one line 'cdpfs: error: ...') or 2 (a usage error), never a
    traceback, a signal or an internal error."""
    stores = _stores(tmp_path)
    assert not any(" fuse.cdpfs " in line for line in Path("/proc/mounts").read_text()
                   .splitlines() if str(tmp_path) in line)

    def run(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        return cmd, cdpfs(*cmd, check=False, timeout=60, stdin=subprocess.DEVNULL)

    bad = []
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, _commands(stores, tmp_path)))
    finally:  # nothing here may mount; if something did, leave nothing mounted
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if str(tmp_path) in line]
        for mnt in mounted:
            force_unmount(Path(mnt))
    for cmd, proc in results:
        err = proc.stderr.strip()
        lines = err.splitlines()
        why = None
        if "Traceback" in err or "internal error" in err:
            why = "traceback"
        elif proc.returncode not in (0, 1, 2):
            why = f"exit status {proc.returncode}"
        elif proc.returncode == 1 and not (len(lines) == 1
                                           and lines[0].startswith("cdpfs: error: ")):
            why = "not one error line"
        if why:
            bad.append(f"cdpfs {' '.join(cmd)[:120]}: {why}: {err[-300:]}")
    assert not mounted, f"a command mounted something: {mounted}"
    assert not bad, "\n".join(bad)
