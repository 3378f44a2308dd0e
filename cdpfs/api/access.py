"""Who may do what through the node API.

- The health endpoints (``/health``, ``/primary``, ``/replica``) tell the role
  and the lag only: anyone may ask.
- Everything else needs a token (``Authorization: Bearer TOKEN``) from the
  tokens file (``--api-tokens FILE``), one per line, ``ROLE NAME TOKEN``: a
  ``viewer`` token reads, an ``admin`` token also acts (POST). ``NAME`` is who
  the token belongs to: every action is logged and reported with it. The file
  must be readable by its owner only. Without a tokens file, only a loopback
  API reads without a token, and nobody acts.
- An API on anything but loopback needs TLS (``--api-cert``/``--api-key``) for
  anything but the health endpoints: without it, it serves those only (a load
  balancer's checks are plain HTTP: ``ha join --health`` on a node's address).
- An action must come as ``application/json`` with no ``Origin`` other than the
  node's own: a page of another site cannot make a browser send one (CSRF).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CdpfsError

ROLES = ("viewer", "admin")
MAX_TOKENS_FILE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the token's name and role ("" and "anonymous" for
    an open loopback API)."""

    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == "admin"


ANONYMOUS = Caller("", "anonymous")


@dataclass(frozen=True, slots=True)
class Access:
    """The tokens a node's API accepts (none: ``open_reads`` decides)."""

    tokens: dict[str, Caller] = field(default_factory=dict)
    open_reads: bool = True  # reads without a token (a loopback API without tokens)
    health_only: bool = False  # beyond loopback without TLS: the health endpoints only

    def caller(self, authorization: str | None) -> Caller | None:
        """Who an ``Authorization`` header names (None: nobody with a right to read)."""
        if authorization and authorization.startswith("Bearer "):
            given = authorization[7:].strip().encode()
            for token, who in self.tokens.items():
                if hmac.compare_digest(token.encode(), given):
                    return who
            return None
        return ANONYMOUS if self.open_reads and not self.tokens else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_tokens(path: Path) -> dict[str, Caller]:
    """The tokens of the file at ``path`` (CdpfsError naming the line for a bad one,
    or for a file others may read)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TOKENS_FILE:
            raise CdpfsError(f"{path}: not a tokens file (a small regular file)")
        if st.st_mode & 0o077:
            raise CdpfsError(f"{path}: others may read it (chmod 600 {path})")
        text = path.read_text()
    except OSError as exc:
        raise CdpfsError(f"{path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CdpfsError(f"{path}: not text") from None
    tokens: dict[str, Caller] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 3 or words[0] not in ROLES:
            raise CdpfsError(f"{path}:{n}: expected 'ROLE NAME TOKEN' with ROLE "
                             f"{' or '.join(ROLES)}")
        role, name, token = words
        if len(token) < 16:
            raise CdpfsError(f"{path}:{n}: a token of 16 characters or more")
        if token in tokens:
            raise CdpfsError(f"{path}:{n}: this token is also {tokens[token].name}'s")
        tokens[token] = Caller(name, role)
    return tokens


def check_listen(host: str, tls: bool) -> None:
    """CdpfsError unless all of an API on ``host`` may be served: beyond loopback only
    with TLS (the console's rule; a node's API serves its health endpoints only)."""
    if not tls and not is_loopback(host):
        raise CdpfsError(f"{host}: an API beyond loopback needs TLS (--api-cert and "
                         "--api-key)")


def same_origin(origin: str | None, host: str | None, scheme: str) -> bool:
    """Whether a request's ``Origin`` is the node's own (or absent: not a browser's
    cross-site request)."""
    if origin is None:
        return True
    return host is not None and origin in (f"{scheme}://{host}",)
