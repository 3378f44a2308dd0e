"""Names of past moments: parse the text of an ``@`` name or ``--at`` into a ``Moment``.

Accepted (after the leading ``@``, which is optional here):
ISO times at any precision, local or UTC (``2026-11-25T10:00``,
``2026-11-25T10:00:00.250Z``, ``2026-11-25 10:00+01:00``), the same with ``-``
for ``:`` in the time (``2026-11-25T10-00-00``, safe in Windows names),
relative times (``-30s``, ``-15m``, ``-2h``, ``-3d``, ``-1w``), ``now``, a journal
sequence number (``#12345``) and bookmark names (anything else that is a
valid bookmark name). A time names the state after every record stamped at
or before it. ``history.points.resolve`` turns a moment into a kept point.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass

from ..errors import NotFound


class BadMoment(NotFound):
    """A moment that is malformed, in the future, or names nothing kept."""



@dataclass(frozen=True, slots=True)
class Moment:
    """A parsed moment: ``kind`` is "time" (ns since the epoch), "seq", "bookmark" or
    "now" (the newest record)."""

    kind: str
    value: int | str
    text: str


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhdw])")
_ISO = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<h>\d{2})(?:[:-](?P<m>\d{2})(?:[:-](?P<s>\d{2})(?:\.(?P<frac>\d{1,9}))?)?)?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)
BOOKMARK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")


def parse(spec: str, now_ns: int | None = None) -> Moment:
    """Parse a moment (``@`` optional); BadMoment with the reason if malformed."""
    text = spec[1:] if spec.startswith("@") else spec
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not text:
        raise BadMoment(f"{spec!r}: empty moment")
    if text == "now":
        return Moment("now", 0, spec)
    if text.startswith("#"):
        if not text[1:].isdigit():
            raise BadMoment(f"{spec!r}: a sequence number is '#' and digits")
        return Moment("seq", int(text[1:]), spec)
    rel = _RELATIVE.fullmatch(text)
    if rel:
        back = float(rel[1]) * _UNITS[rel[2]] * 1e9  # inf for hundreds of digits
        if not back <= now_ns:
            raise BadMoment(f"{spec!r}: reaches back before 1970")
        return Moment("time", now_ns - int(back), spec)
    iso = _ISO.fullmatch(text)
    if iso:
        return Moment("time", _iso_ns(iso, spec), spec)
    if text[0].isdigit() and re.match(r"\d{4}-", text):
        raise BadMoment(f"{spec!r}: not a valid time (use 2026-11-25T10:00:00, "
                        "optionally with .fraction and Z or +HH:MM)")
    if text.startswith("-"):
        raise BadMoment(f"{spec!r}: a relative time is -N followed by s, m, h, d or w")
    if not BOOKMARK.fullmatch(text):
        raise BadMoment(f"{spec!r}: not a time, a #sequence or a bookmark name")
    return Moment("bookmark", text, spec)


def _iso_ns(m: re.Match[str], spec: str) -> int:
    try:
        day = dt.date.fromisoformat(m["date"])
        frac = (m["frac"] or "").ljust(9, "0")
        when = dt.datetime(day.year, day.month, day.day, int(m["h"] or 0), int(m["m"] or 0),
                           int(m["s"] or 0))
    except ValueError as exc:
        raise BadMoment(f"{spec!r}: not a valid time: {exc}") from None
    tz = m["tz"]
    try:
        if tz == "Z":
            when = when.replace(tzinfo=dt.UTC)
        elif tz:
            sign = 1 if tz[0] == "+" else -1
            digits = tz[1:].replace(":", "")
            offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            when = when.replace(tzinfo=dt.timezone(sign * offset))
        else:
            when = when.astimezone()  # local time of this machine
        seconds = int(when.timestamp())
    except (ValueError, OverflowError) as exc:  # an offset of 24 h or more, a far year
        raise BadMoment(f"{spec!r}: not a valid time: {exc}") from None
    return seconds * 1_000_000_000 + int(frac)

