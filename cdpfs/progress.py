"""Progress of a long operation (send, receive, export, import, rebuild), shown one way.

A ``Progress`` is told of the bytes done (``advance``, called as often as once a
block: it only adds and looks at the clock) and shows them as its mode says:

* ``auto``: a tqdm bar on the stream (standard error) when it is a terminal, with
  bytes, bytes/s and, when the total is known, the ETA; nothing otherwise (a pipe,
  a file, a log);
* ``bar``: that bar whatever the stream is;
* ``json``: a line of JSON at most once a second, ``{"op": ..., "bytes": N,
  "total": T, "bytes_per_second": R, "eta_seconds": E, "elapsed_seconds": S}``
  (``total`` and ``eta_seconds`` null while the total is unknown; the rate is the
  average since the start), then a last line with ``"done": true`` when it closes
  (``"done": false`` if the operation failed);
* ``none``: nothing.

A failed write to the stream (a reader gone) stops the reports, never the operation.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "json", "none")
INTERVAL_NS = 10**9  # json: at most one line this often


class Progress:
    """The progress of one operation named ``op`` over ``total`` bytes (None: not
    known, or not yet: ``total`` may be set later). A context manager: leaving it
    closes it (done, or failed if an exception left it).

    Attributes:
        done: bytes advanced so far.
        shown: whether anything is shown at all (``auto`` off a terminal, and
            ``none``, show nothing: a caller may skip work done only for a total).
    """

    def __init__(self, mode: str = "auto", op: str = "", total: int | None = None, *,
                 stream: TextIO | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(MODES)}, not {mode!r}")
        self.op = op
        self.done = 0
        self._total = total
        self._stream: TextIO = sys.stderr if stream is None else stream
        self._clock = clock
        self._start = clock()
        self._next = self._start + INTERVAL_NS
        self._closed = False
        self._bar: Any = None
        self._json = mode == "json"
        if mode == "bar" or (mode == "auto" and _is_terminal(self._stream)):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=op or None, unit="B", unit_scale=True,
                             leave=False, dynamic_ncols=True, file=self._stream)
        self.shown = self._json or self._bar is not None

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, total: int | None) -> None:
        self._total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more are done."""
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)  # tqdm redraws at most ten times a second
        elif self._json:
            now = self._clock()
            if now >= self._next:
                self._next = now + INTERVAL_NS
                self._line(now)

    def close(self, ok: bool = True) -> None:
        """The operation ended (``ok``: it completed): the last line, or the bar
        taken away. Once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._json:
            self._line(self._clock(), done=ok)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(ok=kind is None)

    def line(self, now_ns: int, done: bool | None = None) -> dict[str, Any]:
        """What a json line says at ``now_ns`` (``done``: the last one's flag)."""
        elapsed = max(now_ns - self._start, 0) / 1e9
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta: float | None = None
        if done is not None:  # the last line: nothing left, or it failed
            eta = 0.0 if done else None
        elif self._total is not None and rate > 0:
            eta = round(max(self._total - self.done, 0) / rate, 1)
        fields: dict[str, Any] = {
            "op": self.op, "bytes": self.done, "total": self._total,
            "bytes_per_second": round(rate), "eta_seconds": eta,
            "elapsed_seconds": round(elapsed, 3)}
        if done is not None:
            fields["done"] = done
        return fields

    def _line(self, now_ns: int, done: bool | None = None) -> None:
        try:
            self._stream.write(json.dumps(self.line(now_ns, done)) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:  # closed, or its reader went away
            log.debug("progress of %s: no more reports: %s", self.op, exc)
            self._json = False
            self.shown = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False
