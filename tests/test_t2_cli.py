"""The command line on bad input: one clear line on stderr, exit status 1, nothing changed."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import CLI, cdpfs, force_unmount, privileged


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

HUGE = "1" + "9" * 400  # overflows a float, an int64, a msgpack integer
BAD_MOMENTS = ["", "@", "2026-12-01T10:00+25:00", "2026-12-01T10:00-99:99", "2026-13-45",
               "#-1", "#" + "9" * 30, "-1y", "now ", "9999-12-31T23:59:59Z", "x" * 5000, "é@/",
               "-" + HUGE + "s", "-" + HUGE + ".5w", "#" + HUGE]
BAD_NAMES = ["", ".", "..", "../x", "a/b", "a\nb", "-x"]  # more: test_the_name_rule
ETCD = "http://127.0.0.1:1"  # nothing listens there: refused at once


def _hostile_paths(base: Path) -> dict[str, Path]:
    """Paths that no store or file can be at, or only with care: longer than
    PATH_MAX, a component longer than NAME_MAX, a loop of symbolic links, a link to
    nothing, another process's root, bytes that are not UTF-8, a newline, a FIFO."""
    out = {"long": base / "/".join(["d" * 250] * 17),  # > 4096 bytes
           "longname": base / ("n" * 300),  # > 255 bytes in one component
           "proc": Path("/proc/1/root"),
           "loop": base / "loop", "dangling": base / "dangling",
           "nonutf8": base / os.fsdecode(b"bad\xff\xfename"),
           "newline": base / "new\nline", "fifo": base / "fifo"}
    out["loop"].symlink_to("loop")
    out["dangling"].symlink_to(base / "nowhere")
    out["nonutf8"].mkdir()
    out["newline"].mkdir()
    os.mkfifo(out["fifo"])
    return out


def _stores(base: Path) -> dict[str, Path]:
    """Every kind of STORE argument: good, missing, a file, an empty directory, damaged
    ones (truncated, zeroed, a foreign LMDB file), one of another user (unreadable to
    any other but root), one in a directory of another, and every hostile path."""
    import lmdb

    good = base / "good"
    cdpfs("init", good)
    out = {"good": good, "missing": base / "missing", "file": base / "plain",
           "empty": base / "emptydir"}
    out["file"].write_text("not a store")
    out["empty"].mkdir()
    (base / "busy").mkdir()  # a mount point with a file in it: never mounted on
    (base / "busy" / "mine").write_text("x")
    (base / "backups").mkdir()  # backups go there; beside them, records made by hand
    for n, record in enumerate(('{"seq": "x"}', '{"volume": "v", "seq": 1, "point_ts": 1e400, '
                                '"format": "send", "made_at": 1}', "[", "[1]", "x" * 70000)):
        (base / "backups" / f"{n}.cdpfs").write_text("not a stream")
        (base / "backups" / f"{n}.cdpfs.json").write_text(record)
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
    cdpfs("init", base / "unreadable")
    os.chmod(base / "unreadable", 0o700)  # stays its maker's (root's) in the non-root run
    out["unreadable"] = base / "unreadable"
    (base / "rootonly").mkdir()  # likewise: a directory others cannot write in
    out["rootonly"] = base / "rootonly" / "store"
    cdpfs("replica", "keygen", base / "peer", "--name", "peer")  # a certificate to trust
    return {**out, **_hostile_paths(base)}


HOSTILE = ("long", "longname", "proc", "loop", "dangling", "nonutf8", "newline", "fifo")
RIGHTS = ("good", "unreadable", "proc", "missing", "empty", "rootonly")  # where users differ


def _store_commands(st: Path, kind: str, good: Path, base: Path) -> list[list[str | Path]]:
    """Every command that takes a store, on store ``st``."""
    cmds: list[list[str | Path]] = [
        ["status", st], ["verify", st], ["stat", st], ["prune", st], ["retention", st],
        ["config", st], ["bookmarks", "--volume", st], ["bookmark", "b", "--volume", st],
        ["log", "f", "--store", st], ["diff", "#1", "now", "--store", st], ["assess", st],
        ["mount", st, base / "busy"], ["replica", "add", st, "r1", "--address", "h:1"],
        ["replicate", st, "--to", "127.0.0.1:1", "--name", "r1", "--attempts", "1"],
        ["verify", "--compare", st, good], ["init", st], ["clone", st, base / f"of-{kind}"],
        ["replica", "remove", st, "r1"],
        ["replica", "trust", st, base / "peer" / "tls" / "node.crt", "--name", "peer"],
        ["export", st, "--at", "now", "-o", base / f"export-{kind}.tar"],
        ["backup", st, "--to", base / "backups"]]
    if kind != "good":  # these change what a store is: the other commands use the good one
        cmds += [["replica", "promote", st], ["replica", "demote", st],
                 ["replica", "keygen", st]]
    return cmds


def _path_commands(path: Path, good: Path) -> list[list[str | Path]]:
    """Every other kind of path argument, given ``path``."""
    return [["mount", good, path], ["umount", path], ["clone", good, path],
            ["replica", "trust", good, path, "--name", "x"], ["log", path],
            ["restore", path, "--at", "#1"], ["diff", "#1", "now", path, "--store", good],
            ["bookmark", "b2", "--volume", good, "--scenario", path],
            ["replica", "test", good, "--scenario", path],
            ["ha", "create", "c", "--volume", good, "--scenario", path, "--etcd", ETCD],
            ["ha", "join", "c", "n", "--store", path, "--address", "h:1", "--etcd", ETCD],
            ["ha", "status", "c", "--etcd", ETCD, "--etcd-ca", path, "--etcd-cert", path,
             "--etcd-key", path],
            ["export", good, "--at", "now", "-o", path], ["export", good, "--at", "now", path,
                                                          "-o", good.parent / "sub.tar"],
            ["import", path, good.parent / "imported"],
            ["backup", good, "--to", path], ["backups", path]]


def _commands(s: dict[str, Path], base: Path, rights_only: bool = False) -> list[list[str]]:
    """The hostile calls; ``rights_only``: those whose outcome depends on the user
    (stores and paths of others, places it cannot write)."""
    good = s["good"]
    cmds: list[list[str | Path]] = []
    # Root reads and writes the store and directory of another as its own: those two
    # are for the run as another user.
    skip = ("unreadable", "rootonly") if os.geteuid() == 0 and not rights_only else ()
    skip += ("longname", "fifo")  # as stores, no different from "long" and "file"
    for kind, st in s.items():  # every kind of store, good, damaged and hostile
        if (kind in RIGHTS or not rights_only) and kind not in skip:
            cmds += _store_commands(st, kind, good, base)
    for kind in (*HOSTILE, "unreadable"):  # as every other kind of path argument
        if not rights_only or kind in (*RIGHTS, "fifo"):
            cmds += _path_commands(s[kind], good)
    if rights_only:
        return [[str(a) for a in c] for c in cmds]
    cmds += [[], ["--nope"], ["nosuchcommand"], ["-vvvv", "status"], ["replica"], ["ha"],
             ["status"], ["mount", good], ["retention", good, "--hourly"], ["verify", "--nope"],
             ["mount", good, base / "busy", "--history", "maybe"]]
    for name in BAD_NAMES:  # every name argument
        cmds += [["replica", "trust", good, base / "peer" / "tls" / "node.crt", "--name", name],
                 ["replica", "add", good, name, "--address", "h:1"],
                 ["replica", "remove", good, name],
                 ["replicate", good, "--to", "127.0.0.1:1", "--name", name, "--attempts", "1"],
                 ["bookmark", name, "--volume", good],
                 ["bookmark", "--delete", name, "--volume", good],
                 ["ha", "join", "c", name, "--store", good, "--address", "h:1",
                  "--etcd", ETCD],
                 ["ha", "leave", "c", name, "--etcd", ETCD],
                 ["ha", "run", "c", name, "--etcd", ETCD],
                 ["ha", "status", name, "--etcd", ETCD]]
    for n in (HUGE, "-" + HUGE, "nan"):  # every numeric option
        cmds += [["retention", good, "--replica-max-lag", n],
                 ["log", ".", "--store", good, "-n", n],
                 ["replica", "add", good, "r1", "--address", "h:1", "--limit", n],
                 ["replicate", good, "--to", "127.0.0.1:1", "--name", "r1", "--attempts", n],
                 ["verify", "--compare", good, good, "--at", n],
                 ["init", base / "sized", "--block-size", n],
                 ["ha", "create", "c", "--volume", good, "--ttl", n, "--etcd", ETCD],
                 ["ha", "create", "c", "--volume", good, "--interval", n, "--etcd", ETCD],
                 ["ha", "create", "c", "--volume", good, "--max-lag", n, "--etcd", ETCD],
                 ["ha", "create", "c", "--volume", good, "--check", "true",
                  "--check-timeout", n, "--etcd", ETCD],
                 ["ha", "promote", "c", "n", "--timeout", n, "--etcd", ETCD],
                 ["ha", "switchover", "c", "n", "--timeout", n, "--etcd", ETCD],
                 ["replica", "test", good, "--scenario", s["file"], "--nice", n],
                 ["backup", good, "--to", base / "backups", "--keep", n],
                 ["backup", good, "--to", base / "backups", "--nice", n]]
    for d in (HUGE + "s", "1e3s", "inf"):  # every duration
        cmds += [["retention", good, f"--{opt}", d] for opt in
                 ("keep-all", "minutely", "hourly", "daily", "prune-interval")]
        cmds += [["assess", good, "--since", d], ["assess", good, "--lag", d],
                 ["replica", "serve", good, "--listen", "127.0.0.1:1", "--test-every", d,
                  "--test-scenario", s["file"]],
                 ["replica", "serve", good, "--listen", "127.0.0.1:1", "--backup-every", d,
                  "--backup-to", base]]
    for rate in ("inf", "1e400", "-5"):
        cmds += [["replica", "add", good, "r1", "--address", "h:1", "--limit", rate]]
    for url in ("http://[::1", "http://h:99999", "ftp://h:1"):  # etcd URLs
        cmds += [["ha", "status", "c", "--etcd", url],
                 ["ha", "create", "c", "--volume", good, "--etcd", url],
                 ["ha", "join", "c", "n", "--store", good, "--address", "h:1", "--etcd", url]]
    cmds += [["backups", base / "backups"], ["backup", good, "--to", base / "backups",
                                             "--format", "zip"],
             ["retention", good, "--keep-all", "forever"], ["retention", good, "--daily", "1s"],
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
             ["verify", good, "--at", "3"], ["init", good, "--block-size", "12345"],
             ["clone", good, base / "a,b"], ["clone", good, base / "a#b"],
             ["clone", good, base / ("p" * 200) / ("q" * 200) / "clone"],
             ["import", s["file"], base / "from-plain"], ["import", good / "data.mdb", good],
             ["export", good, "--at", "now", "..", "-o", base / "up.tar"]]
    cmds += [["init", base / "new", "--block-size", n] for n in ("0", "-4096", "1" * 40, "x")]
    for moment in BAD_MOMENTS:
        cmds += [["log", "f", "--store", good, "--at", moment],
                 ["diff", moment, "now", "--store", good],
                 ["bookmark", "b", "--at", moment, "--volume", good],
                 ["mount", "--at", moment, good, base / "busy"],
                 ["export", good, "--at", moment, "-o", base / "at.tar"]]
    cmds += [["clone", good, base / "clone-at", "--at", m] for m in BAD_MOMENTS[::3]]
    return [[str(a) for a in c] for c in cmds]


def _as_user(name: str) -> list[str]:
    """The prefix that runs a command as user ``name`` with no groups and no
    capabilities (skips if there is no such user or this process cannot switch)."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name!r} on this system to run the commands as")
    if not privileged() or shutil.which("setpriv") is None:
        pytest.skip(f"running commands as {name} needs root and setpriv")
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    proc = subprocess.run([*prefix, *CLI, "--help"], capture_output=True, timeout=60)
    assert proc.returncode == 0, (f"user {name} cannot run {CLI[0]} (the virtualenv and "
                                  f"the checkout must be readable by it): {proc.stderr!r}")
    return prefix


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory every user can reach (tmp_path's parents are root's
    alone), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="cdpfs-t2-"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                   if str(base) in line]
        for mnt in mounted:
            force_unmount(Path(mnt))
        shutil.rmtree(base, ignore_errors=True)


def _judge(cmd: list[str], proc: subprocess.CompletedProcess[bytes] | None) -> str | None:
    """What is wrong with how ``cdpfs CMD`` ended, if anything."""
    if proc is None:
        return "hung (no end within 60 s)"
    try:
        out, err = proc.stdout.decode(), proc.stderr.decode()
    except UnicodeDecodeError as exc:
        return f"printed bytes that are not UTF-8: {exc}"
    lines = err.strip().splitlines()
    if "Traceback" in err or "internal error" in err:
        return "traceback"
    if proc.returncode not in (0, 1, 2):
        return f"exit status {proc.returncode}"
    if proc.returncode == 1 and not (len(lines) == 1 and lines[0].startswith("cdpfs: error: ")):
        return "not one error line"
    if proc.returncode == 2 and not (
            (len(lines) == 1 and lines[0].startswith("cdpfs: error: ")
             and lines[0].endswith(" --help')"))
            or (cmd in ([], ["replica"], ["ha"]) and err.startswith("Usage: "))):
        return "a usage error not in one line"
    raw = [c for c in out + err if c not in "\n" and unicodedata.category(c) == "Cc"]
    if raw:
        return f"printed control characters {raw!r}"
    if any("\n" in a and a in out + err for a in cmd):
        return "printed a newline of an argument as is"
    return None


@pytest.mark.parametrize("user", ["self", "nobody"])
def test_no_command_prints_a_traceback(open_tmp: Path, user: str) -> None:
    """Every command with missing, malformed and hostile arguments (huge numbers, names
    that are paths, paths too long, looping, unreadable, not UTF-8, FIFOs) and damaged
    stores: exit 0, 1 (one line 'cdpfs: error: ...') or 2 (one line, a usage error),
    never a traceback, a signal, a hang, or a raw control character; run as this
    process's user and as nobody (on stores of its own, and one it cannot read)."""
    prefix = [] if user == "self" else _as_user(user)
    stores = _stores(open_tmp)
    if prefix:  # its own stores, but for the one of root's it must not be able to read
        owner = pwd.getpwnam(user)
        for root, dirs, files in os.walk(open_tmp):
            for entry in [root, *(os.path.join(root, n) for n in dirs + files)]:
                if "unreadable" not in entry and "rootonly" not in entry:
                    os.lchown(entry, owner.pw_uid, owner.pw_gid)

    def run(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess[bytes] | None]:
        try:
            return cmd, subprocess.run([*prefix, *CLI, *cmd], capture_output=True, timeout=60,
                                       stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return cmd, None

    commands = _commands(stores, open_tmp, rights_only=bool(prefix))
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, commands))
    took = time.monotonic() - started
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
               if str(open_tmp) in line]
    assert not mounted, f"a command mounted something: {mounted}"
    bad = []
    for cmd, proc in results:
        why = _judge(cmd, proc)
        if why:
            said = (proc.stderr[-300:] if proc else b"").decode(errors="backslashreplace")
            bad.append(f"cdpfs {' '.join(cmd)[:120]!r}: {why}: {said}")
    assert not bad, f"{len(bad)} of {len(commands)} commands:\n" + "\n".join(bad)
    print(f"{len(commands)} commands as {user} in {took:.0f} s")


# --- names, FIFOs, clone paths, usage errors --------------------------------------------------


def test_trust_refuses_a_name_that_is_a_path(tmp_path: Path) -> None:
    """'replica trust --name ../node' once wrote the store's own certificate: a peer
    name is 1-64 letters, digits, _ . - and nothing outside tls/trusted/ changes."""
    store, peer = tmp_path / "s", tmp_path / "peer"
    cdpfs("replica", "keygen", store, "--name", "me")
    cdpfs("replica", "keygen", peer, "--name", "peer")
    own = (store / "tls" / "node.crt").read_bytes()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for name in ("../node", "../../s/tls/node", ".", "..", "", "a/b", "a\nb", "-x", "x" * 65):
        proc = cdpfs("replica", "trust", store, peer / "tls" / "node.crt", "--name", name,
                     check=False)
        _one_line_error(proc, "name is 1 to 64 letters, digits")
    assert (store / "tls" / "node.crt").read_bytes() == own
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    cdpfs("replica", "trust", store, peer / "tls" / "node.crt", "--name", "dr-site_2.b")
    assert os.listdir(store / "tls" / "trusted") == ["dr-site_2.b.crt"]  # no temporary left
    assert (store / "tls" / "trusted" / "dr-site_2.b.crt").read_bytes() == \
        (peer / "tls" / "node.crt").read_bytes()


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """'replica trust S FIFO' blocked forever; a FIFO given for a certificate or a
    scenario is refused at once."""
    store = tmp_path / "s"
    cdpfs("init", store)
    cdpfs("replica", "keygen", store, "--name", "me")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["replica", "trust", store, fifo, "--name", "x"],
                 ["bookmark", "b", "--volume", store, "--scenario", fifo]):
        started = time.monotonic()
        try:
            proc = cdpfs(*args, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cdpfs {' '.join(map(str, args))} waited on the FIFO")
        _one_line_error(proc, "not a regular file")
        assert time.monotonic() - started < 30
    assert os.listdir(store / "tls" / "trusted") == []


def test_clone_refuses_a_path_no_mount_can_name(tmp_path: Path) -> None:
    """A clone at a path with ',' (which ends a FUSE option) or '#' (which marks a
    read-only mount) could never be mounted; 'clone --at ""' is no moment, as for
    mount --at."""
    store = tmp_path / "s"
    cdpfs("init", store)
    for name in ("a,b", "a#b", "x,y#z"):
        _one_line_error(cdpfs("clone", store, tmp_path / name, check=False),
                        "must not contain ',' or '#'")
        assert not os.path.lexists(tmp_path / name)
    link = tmp_path / "plain"
    (tmp_path / "a,dir").mkdir()
    link.symlink_to(tmp_path / "a,dir")  # the path a mount would name has the ','
    _one_line_error(cdpfs("clone", store, link / "c", check=False), "',' or '#'")
    _one_line_error(cdpfs("clone", store, tmp_path / "c", "--at", "", check=False),
                    "empty moment")
    _one_line_error(cdpfs("mount", store, tmp_path / "c", "--at", "", check=False),
                    "empty moment")
    assert not os.path.lexists(tmp_path / "c")


def test_usage_errors_are_one_line() -> None:
    """A missing argument, an unknown option, a bad choice: one line naming the help to
    see, exit status 2; --help itself is click's, unchanged."""
    for args, words in ((["status"], "missing argument 'STORE' (see 'cdpfs status --help')"),
                        (["replica", "add", "/"], "see 'cdpfs replica add --help'"),
                        (["retention", "/", "--hourl"], "no such option '--hourl'"),
                        (["mount", "/", "/", "--history", "maybe"], "'maybe' is not one of"),
                        (["nosuch"], "no such command 'nosuch' (see 'cdpfs --help')")):
        proc = cdpfs(*args, check=False)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc
        assert lines[0].startswith("cdpfs: error: ") and words in lines[0], lines
    proc = cdpfs("status", "--help")
    assert proc.stdout.startswith("Usage: cdpfs status [OPTIONS] STORE") and not proc.stderr
    assert "replicate" in cdpfs("--help").stdout


def test_the_last_resort_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError or any other exception no check caught (a bug) ends as one line,
    the path's control characters and bytes that are not UTF-8 escaped."""
    import errno

    import click

    from cdpfs.tools.cli import _Group

    group = _Group("cdpfs")

    @group.command("oserror")
    def oserror() -> None:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG),
                      os.fsdecode(b"/a\nb\xff"))

    @group.command("bug")
    def bug() -> None:
        raise KeyError("x\ny")

    @group.command("echo")
    @click.argument("word")
    def echo(word: str) -> None:
        click.echo(word)

    for args, code, line in ((["oserror"], 1, "cdpfs: error: /a\\nb\\xff: File name too long"),
                             (["bug"], 1, "cdpfs: error: internal error: KeyError: 'x\\ny'"),
                             (["echo"], 2, "cdpfs: error: missing argument 'WORD' "
                                           "(see 'cdpfs echo --help')")):
        with pytest.raises(SystemExit) as ended:
            group.main(args, prog_name="cdpfs")
        assert ended.value.code == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(line), err


def test_the_name_rule() -> None:
    """One rule for peer, replica, node and cluster names; every name the docs and
    tests use keeps to it."""
    from cdpfs.names import BadName, check_name, shown

    for name in ("r1", "r2", "primary", "n1", "a", "dr-site.2", "_x", "A" * 64, "replica"):
        assert check_name(name) == name
    for name in ("", ".", "..", "../x", "a/b", "a\nb", "-x", ".x", "x" * 65, "é", "a b",
                 os.fsdecode(b"\xff")):
        with pytest.raises(BadName, match="1 to 64 letters"):
            check_name(name)
    assert shown("plain é") == "plain é"
    assert shown("a\nb\tc\x1b[31m") == "a\\nb\\tc\\x1b[31m"
    assert shown(os.fsdecode(b"x\xff\xfe")) == shown(b"x\xff\xfe") == "x\\xff\\xfe"
    assert shown(Path("/t/\u2028")) == "/t/\\u2028"


def test_every_command_is_where_the_table_says() -> None:
    """cdpfs imports only the module of the command it runs: the table of where each
    command is must name every command (a missing one still works, but slowly)."""
    import importlib

    from cdpfs.tools import cli

    for module in cli._MODULES:
        mod = importlib.import_module(f"cdpfs.tools.{module}")
        for command in mod.COMMANDS:
            assert cli._WHERE.get(command.name) == module, command.name
    assert set(cli._WHERE) <= set(cli.main.list_commands(None))  # type: ignore[arg-type]
