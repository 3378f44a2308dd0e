"""A client of etcd's v3 API, from trio: keys, leases, transactions and watches.

It speaks the JSON gateway every etcd member serves beside gRPC (``POST /v3/...``,
keys and values in base64, 64-bit integers as strings) over httpx, whose
``AsyncClient`` runs on trio: no gRPC stack, no thread per call, and a client
that is as well kept as the HTTP library under it. The python gRPC clients of
etcd (``etcd3``, ``aioetcd3``) are unmaintained or asyncio-only; etcd itself
documents and tests the gateway.

A client knows every member's URL and sends each request to the member that
answered last, moving on to the next when one does not answer within
``timeout``; a request no member answers raises ``ClusterError`` with one line.
TLS with a client certificate (``Tls``) is what a cluster should run: etcd with
``--client-cert-auth`` refuses a client whose certificate its CA did not sign.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import trio

from ..errors import ClusterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tls:
    """The files a client authenticates with: the cluster's CA, its certificate, its key."""

    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ClusterError(f"etcd TLS files: {exc}") from exc
        return ctx


class KV(NamedTuple):
    """One key as etcd holds it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


class Event(NamedTuple):
    """A change seen by a watch: ``kv.value`` is empty for a delete."""

    deleted: bool
    kv: KV


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _kv(item: dict[str, Any]) -> KV:
    return KV(
        base64.b64decode(item.get("key", "")).decode(errors="replace"),
        base64.b64decode(item.get("value", "")),
        int(item.get("create_revision", 0)),
        int(item.get("mod_revision", 0)),
        int(item.get("lease", 0)),
    )


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix`` (etcd's rule:
    the prefix with its last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return "\0"
    raw[-1] += 1
    return raw.decode(errors="surrogateescape")


class Etcd:
    """A connection to an etcd cluster (use ``async with``; ``aclose`` ends it)."""

    def __init__(self, endpoints: Sequence[str], tls: Tls | None = None,
                 timeout: float = 2.0) -> None:
        if not endpoints:
            raise ClusterError("no etcd endpoint given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._first = 0  # the member that answered last
        verify: ssl.SSLContext | bool = tls.context() if tls is not None else True
        self._http = httpx.AsyncClient(verify=verify, timeout=timeout)

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- requests ---------------------------------------------------------------------

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._first + i) % n for i in range(n)]

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first member that answers."""
        problems = []
        for i in self._order():
            url = f"{self.endpoints[i]}/v3/{path}"
            try:
                resp = await self._http.post(url, json=body)
            except httpx.HTTPError as exc:
                problems.append(f"{self.endpoints[i]}: {_reason(exc)}")
                continue
            if resp.status_code == 200:
                self._first = i
                return resp.json()
            message = _message(resp)
            if resp.status_code >= 500 and "leader" in message:
                problems.append(f"{self.endpoints[i]}: {message}")  # a member cut off
                continue
            raise ClusterError(f"etcd refused {path}: {message}")
        raise ClusterError("no etcd member answered (" + "; ".join(problems) + ")")

    async def get(self, key: str) -> KV | None:
        out = await self.call("kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> list[KV]:
        out = await self.call("kv/range", {"key": _b64(prefix),
                                           "range_end": _b64(prefix_end(prefix))})
        return [_kv(item) for item in out.get("kvs") or []]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set ``key``; the revision of the change."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        out = await self.call("kv/put", body)
        return int(out["header"]["revision"])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Remove ``key`` (every key under it with ``prefix``); how many went."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        out = await self.call("kv/deleterange", body)
        return int(out.get("deleted", 0))

    async def swap(self, key: str, value: bytes, *, mod_revision: int = 0,
                   lease: int = 0) -> bool:
        """Set ``key`` only if it was last changed at ``mod_revision`` (0: only if it does
        not exist): the one compare-and-set elections and counters are built on."""
        compare = {"key": _b64(key), "result": "EQUAL"}
        if mod_revision:
            compare |= {"target": "MOD", "mod_revision": str(mod_revision)}
        else:
            compare |= {"target": "CREATE", "create_revision": "0"}
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        out = await self.call("kv/txn", {"compare": [compare],
                                         "success": [{"request_put": put}]})
        return bool(out.get("succeeded", False))

    # --- leases -----------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        out = await self.call("lease/grant", {"TTL": str(ttl)})
        if out.get("error"):
            raise ClusterError(f"etcd refused a lease: {out['error']}")
        return int(out["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` for its whole TTL once; the TTL granted, 0 if it is gone."""
        out = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(out.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it goes."""
        try:
            await self.call("lease/revoke", {"ID": str(lease)})
        except ClusterError as exc:
            if "not found" not in str(exc):
                raise

    async def time_to_live(self, lease: int) -> int:
        """Seconds ``lease`` has left by etcd's reckoning (-1 or 0 when it is gone)."""
        out = await self.call("lease/timetolive", {"ID": str(lease)})
        return int(out.get("TTL", -1))

    # --- watches ----------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[list[Event]]:
        """The changes to keys under ``prefix`` from ``start_revision`` on (0: from now),
        a batch per etcd response, until the connection ends (then ``ClusterError``:
        the caller reads the state again and watches from its revision)."""
        create: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        if start_revision:
            create["start_revision"] = str(start_revision)
        problems = []
        for i in self._order():
            url = f"{self.endpoints[i]}/v3/watch"
            try:
                async with self._http.stream("POST", url, json={"create_request": create},
                                             timeout=httpx.Timeout(self.timeout, read=None)
                                             ) as resp:
                    if resp.status_code != 200:
                        problems.append(f"{self.endpoints[i]}: HTTP {resp.status_code}")
                        continue
                    self._first = i
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        result = json.loads(line).get("result", {})
                        events = [Event(e.get("type") == "DELETE", _kv(e.get("kv", {})))
                                  for e in result.get("events") or []]
                        if events:
                            yield events
                    problems.append(f"{self.endpoints[i]}: the watch ended")
                    break
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                problems.append(f"{self.endpoints[i]}: {_reason(exc)}")
                await trio.lowlevel.checkpoint()
        raise ClusterError("etcd watch: " + "; ".join(problems))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("message") or body.get("error") or body)[:200]
    except ValueError:
        return f"HTTP {resp.status_code}"
