"""Progress reports (``cdpfs.progress``) on a fake clock, and as export and import feed
them on real stores (no FUSE): JSON lines at most once a second with rising bytes and
a last ``done`` line counting every byte processed; nothing at all with ``none``, or
with ``auto`` off a terminal.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from cdpfs.fs.tarimport import import_tar
from cdpfs.history.export import data_size, export_volume
from cdpfs.progress import Progress
from cdpfs.store.lmdb import Store
from cdpfs.testing import FakeClock, LiveStore

MIB = 1 << 20


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_come_at_most_once_a_second_and_end_with_done() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("json", "export", 10_000, stream=out, clock=clock) as p:
        assert p.shown
        for _ in range(100):  # 100 blocks of 100 bytes, 0.05 s apart: 5 s in all
            p.advance(100)
            clock.advance(0.05)
        p.advance(0)  # a tick that does nothing but look at the clock
    said = lines(out.getvalue())
    reports, last = said[:-1], said[-1]
    assert 4 <= len(reports) <= 5  # after 1, 2, 3, 4 (and 5) seconds, never more often
    assert all(r.keys() == {"op", "bytes", "total", "bytes_per_second", "eta_seconds",
                            "elapsed_seconds"} for r in reports)
    assert [r["bytes"] for r in reports] == sorted({r["bytes"] for r in reports})  # rising
    elapsed = [r["elapsed_seconds"] for r in reports]
    assert all(b - a >= 0.999 for a, b in itertools.pairwise(elapsed))
    first = reports[0]
    assert first["op"] == "export" and first["total"] == 10_000
    assert first["bytes_per_second"] == pytest.approx(2000, rel=0.1)  # 100 B per 0.05 s
    assert first["eta_seconds"] == pytest.approx((10_000 - first["bytes"]) / 2000, rel=0.1)
    assert last["done"] is True and last["bytes"] == 10_000 and last["eta_seconds"] == 0
    assert last["elapsed_seconds"] == pytest.approx(5.0)


def test_nothing_before_a_second_but_the_last_line() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("json", "import", stream=out, clock=clock) as p:
        for _ in range(10_000):
            p.advance(4096)
        clock.advance(0.9)
        p.advance(1)
    [last] = lines(out.getvalue())
    assert last == {"op": "import", "bytes": 10_000 * 4096 + 1, "total": None,
                    "bytes_per_second": round((10_000 * 4096 + 1) / 0.9),
                    "eta_seconds": 0.0, "elapsed_seconds": 0.9, "done": True}


def test_a_total_set_later_and_a_failed_operation() -> None:
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError), Progress("json", "export", stream=out, clock=clock) as p:
        clock.advance(1)
        p.advance(10)
        assert lines(out.getvalue())[-1]["total"] is None
        p.total = 40
        clock.advance(1)
        p.advance(10)
        assert lines(out.getvalue())[-1]["eta_seconds"] == pytest.approx(2.0)
        raise RuntimeError("the operation failed")
    last = lines(out.getvalue())[-1]
    assert last["done"] is False and last["bytes"] == 20 and last["eta_seconds"] is None
    p.close()  # once only
    assert len(lines(out.getvalue())) == 3


class Pipe(io.StringIO):
    """A stream that is not a terminal (as standard error on a pipe)."""

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_none_and_auto_off_a_terminal_show_nothing(mode: str) -> None:
    clock, out = FakeClock(), Pipe()
    with Progress(mode, "export", 100, stream=out, clock=clock) as p:
        for _ in range(10):
            p.advance(10)
            clock.advance(1)
    assert not p.shown and p.done == 100 and out.getvalue() == ""


def test_a_stream_that_fails_stops_the_reports_not_the_work() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress("json", "export", stream=out, clock=clock)
    out.close()
    clock.advance(2)
    p.advance(5)  # the write fails: no more reports
    p.advance(5)
    p.close()
    assert p.done == 10 and not p.shown


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, bar, json, none"):
        Progress("loud")


def test_export_and_import_report_every_byte_of_file_data(tmp_path: Path) -> None:
    store = tmp_path / "vol.store"
    rng = random.Random(4)
    sizes = [0, 1, 5000, 3 * MIB + 17, 40 * 1024]
    with LiveStore(store) as live:
        for i, size in enumerate(sizes):
            fh, _ = live.create(b"f%d" % i)
            if size:
                live(live.fs.write, fh, 0, rng.randbytes(size))
            live(live.fs.release, fh)
        live(live.fs.link, live(lambda: live.fs.view.lookup(1, b"f3")), 1, b"again")
        live.sync()
    archive = io.BytesIO()
    clock = FakeClock()
    err = io.StringIO()
    with Progress("json", "export", stream=err, clock=clock) as p:
        point, result = export_volume(store, "now", nullcontext(archive), progress=p)
    [last] = lines(err.getvalue())
    assert last["done"] and last["bytes"] == result.data_bytes == sum(sizes)
    assert last["total"] == sum(sizes) and p.total == sum(sizes)
    with Store(store) as st:  # the total: every file's data, f3's once
        assert data_size(st, point.seq) == data_size(st, point.seq, ["f3", "again"]) + \
            sum(sizes) - sizes[3]
    # a Progress that shows nothing is not given a total (no walk for it)
    with Progress("none", "export") as quiet:
        export_volume(store, "now", nullcontext(io.BytesIO()), progress=quiet)
    assert quiet.total is None and quiet.done == sum(sizes)
    err = io.StringIO()
    archive.seek(0)
    with Progress("json", "import", stream=err, clock=clock) as p:
        made = import_tar(archive, tmp_path / "new.store", progress=p.advance)
    [last] = lines(err.getvalue())
    assert last["done"] and last["bytes"] == made.data_bytes == sum(sizes)
    assert os.path.isdir(tmp_path / "new.store")

