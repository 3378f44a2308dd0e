"""``--json`` on the reporting commands, read as a program would.

A real mount; each command's document is parsed and checked against what the
volume holds: ``stat`` (bytes and files), ``log`` (the versions of a file, newest
first), ``diff`` (what changed between two bookmarks), ``verify`` (ok, and exit
status 0) and ``backups`` (a backup made into a directory). Times are ISO 8601
in UTC.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness import Volume, cdpfs

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def _doc(*args: str | Path) -> dict:
    return json.loads(cdpfs(*args, "--json").stdout)


def test_reporting_commands_print_one_json_document(volume: Volume, tmp_path: Path) -> None:
    m = volume.mnt
    (m / "a.txt").write_text("one\n")
    volume.sync()
    cdpfs("bookmark", "before", "--volume", m)
    (m / "a.txt").write_text("two, longer\n")
    (m / "b.bin").write_bytes(b"\0" * 300_000)
    volume.sync()
    cdpfs("bookmark", "after", "--volume", m)

    stat = _doc("stat", m)
    assert stat["live_files"] == 2 and stat["live_bytes"] == len("two, longer\n") + 300_000
    assert ISO.fullmatch(stat["last_time"]) and stat["records"] >= 4

    log = _doc("log", m / "a.txt")
    sizes = [v["size"] for v in log["versions"]]
    assert log["path"] == "a.txt" and sizes[0] == len("two, longer\n") and 4 in sizes
    seqs = [v["seq"] for v in log["versions"]]
    assert seqs == sorted(seqs, reverse=True) and all(ISO.fullmatch(v["time"])
                                                      for v in log["versions"])

    diff = _doc("diff", "before", "after", m)
    assert {(c["kind"], c["path"]) for c in diff["changes"]} == {("M", "a.txt"),
                                                                 ("A", "b.bin")}
    assert diff["counts"] == {"A": 1, "M": 1, "D": 0, "R": 0}

    volume.umount()
    verify = cdpfs("verify", volume.store, "--json")
    assert verify.returncode == 0
    assert json.loads(verify.stdout) == {"format": 1, "store": str(volume.store), "ok": True,
                                         "problems": [], "notes": []}
    backups = tmp_path / "backups"
    backups.mkdir()
    cdpfs("backup", volume.store, "--to", backups)
    listed = _doc("backups", backups)
    [made] = listed["backups"]
    assert made["state"] == "verified" and made["record"]["verified"] is True
    status = _doc("status", volume.store)
    assert made["record"]["seq"] == status["journal"]["last_seq"]
    assert status["backups"]["verified"]["file"] == made["file"]
    volume.mount()


def test_status_watch_shows_it_again_in_place_until_ctrl_c(volume: Volume) -> None:
    """On a terminal (a pseudo-terminal here), each refresh clears the screen and
    draws the status again at the top; Ctrl-C ends it with status 0."""
    import os
    import pty
    import signal
    import subprocess
    import threading
    import time

    from harness import CLI

    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CLI, "status", str(volume.store), "--watch", "0.2"],
                            stdout=follower, stderr=follower)
    os.close(follower)
    got: list[bytes] = []

    def read() -> None:  # all along: a full terminal buffer would block the command
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other side is closed: all read
                return
            if not chunk:
                return
            got.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    (volume.mnt / "new").write_text("seen by the next refresh\n")
    volume.sync()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    reader.join(timeout=10)
    os.close(leader)
    screens = b"".join(got).decode().split("\x1b[H\x1b[2J")[1:]
    assert len(screens) >= 3 and all(s.startswith("store ") for s in screens)
    last = [int(re.search(r"last #(\d+)", s).group(1)) for s in screens]  # type: ignore
    assert last[-1] > last[0]  # the write shows without running it again
