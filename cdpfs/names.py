"""Names users give, and how names and paths are shown to them.

``check_name`` is the one rule for the names of peers, replicas, HA nodes and
clusters: such a name becomes a file name (``tls/trusted/NAME.crt``), a key in
the store and in etcd, and a word in log lines, so it is 1 to 64 letters, digits,
``_``, ``.`` or ``-``, and does not start with ``.`` or ``-`` (no ``/``, no
``..``, no option look-alike, nothing to escape).

``shown`` makes any text (a path from the command line, a name read from a store)
safe to print on one line: control characters are escaped (a newline as ``\\n``)
and bytes that are not UTF-8 (kept as lone surrogates by Python's file-system
decoding) as ``\\xNN``, so printing never fails with UnicodeEncodeError and an
error stays one line.
"""

from __future__ import annotations

import os
import re
import unicodedata

from .errors import CdpfsError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"


class BadName(CdpfsError):
    """A name that breaks the rule of ``check_name``."""


def check_name(name: str, what: str = "peer") -> str:
    """``name`` if it is a valid name of a ``what`` (peer, replica, node, cluster);
    BadName saying the rule if not."""
    if not NAME.fullmatch(name):
        short = name if len(name) <= 80 else name[:80] + "..."
        raise BadName(f"{short!r}: a {what} name is {NAME_RULE}")
    return name


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = {"Cc", "Cs", "Zl", "Zp"}  # controls, lone surrogates, line and paragraph separators


def shown(text: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None) -> str:
    """``text`` fit to print on one line of a terminal (see the module docstring)."""
    if text is None:
        return ""
    raw = os.fspath(text)
    s = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch == " " or unicodedata.category(ch) not in _UNSAFE:
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100
                                            else f"\\u{ord(ch):04x}"))
    return "".join(out)


def volume_path(text: object) -> str:
    """A path inside a volume as a request names it (``a/b`` or ``/a/b``, from the
    volume's root), as a relative path; BadName for anything that would lead
    elsewhere: ``..``, ``.``, empty parts, a first part starting with ``@`` (the
    volume's history, read-only), a NUL, or the root itself."""
    if not isinstance(text, str) or not text.strip("/"):
        raise BadName(f"{shown(str(text))}: a path inside the volume, such as docs/a.txt")
    parts = text.strip("/").split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts) or parts[0].startswith("@"):
        raise BadName(f"{shown(text)}: a path inside the volume, without '.', '..' or "
                      "empty parts, not in its history (@...)")
    return "/".join(parts)
