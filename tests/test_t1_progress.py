"""Progress reports (``cdpfs.progress``) on a fake clock: JSON lines at most once a
second with rising bytes and a last ``done`` line counting every byte processed;
nothing at all with ``none``, or with ``auto`` off a terminal.
"""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

import pytest

from cdpfs.progress import Progress
from cdpfs.testing import FakeClock


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

