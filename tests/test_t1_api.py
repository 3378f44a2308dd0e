"""The node API over a real socket: hypercorn in the test's trio loop, a live volume
served in-process, httpx as the client (no FUSE, no root).

What an operator or a load balancer checks: the health endpoints' codes; the
status document and the metrics tell the same figures as the library; events
come with gap-free ids and arrive as they happen; the tokens: no token, a wrong
one, a viewer's on an action, another site's page, a huge, slow or malformed
request: each refused with one line, and the node goes on serving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cdpfs.api.app import Served
from cdpfs.api.server import ApiOptions, serve_api
from cdpfs.errors import CdpfsError
from cdpfs.fs.mutate import init_volume
from cdpfs.store import journal
from cdpfs.testing import served
from cdpfs.volume import Volume

ADMIN, VIEWER = "admin-token-0123456789", "viewer-token-0123456789"


def _tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may\nadmin ops {ADMIN}\nviewer grafana {VIEWER}\n")
    path.chmod(0o600)
    return path


async def _write(vol: Volume, name: bytes, data: bytes) -> None:
    assert vol.fs is not None
    fh, _ = await vol.call(vol.fs.create, 1, name, 0o644, os.O_RDWR, 0, 0)
    await vol.write(fh, 0, data)
    await vol.fsync(fh)
    await vol.call(vol.fs.release, fh)


def _metrics(text: str) -> dict[str, float]:
    """Each sample of a metrics page by name (labels joined in)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_health_status_metrics_and_events_of_a_live_volume(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    init_volume(path).close()
    options = ApiOptions("127.0.0.1:0", tokens=_tokens(tmp_path))
    async with served(path) as vol, trio.open_nursery() as nursery:
        url = await nursery.start(serve_api, options, Served(vol, "mount"))
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=_bearer(ADMIN)) as http:
            # load balancers: the live volume is the primary that takes writes
            r = await http.get("/primary")
            assert (r.status_code, r.json()) == (200, {"role": "primary", "lag": 0})
            assert (await http.get("/replica")).status_code == 503
            assert (await http.get("/replica?lag=x")).status_code == 400
            assert (await http.get("/health")).status_code == 200

            await _write(vol, b"a", b"x" * 300_000)
            assert vol.store is not None
            with vol.store.txn() as txn:
                top = journal.top(vol.store, txn)
            doc = (await http.get("/api/v1/status")).json()
            assert doc["store"] == str(path)
            assert doc["journal"]["records"] >= 2
            assert doc["journal"]["last_time"].endswith("Z")
            assert doc["window"]["oldest_seq"] >= 1
            assert doc["journal"]["last_seq"] == top

            stat = (await http.get("/api/v1/stat")).json()
            assert (stat["live_files"], stat["live_bytes"]) == (1, 300_000)
            changes = (await http.get("/api/v1/changes", params={"a": "#1"})).json()
            assert changes["changes"] == [{"kind": "A", "path": "a"}]
            assert changes["to_seq"] == top
            r = await http.get("/api/v1/changes", params={"a": "#1", "path": "../x"})
            assert r.status_code == 400 and "inside the volume" in r.json()["error"]
            tree = (await http.get("/api/v1/tree", params={"at": "now"})).json()
            assert [(e["name"], e["size"]) for e in tree["entries"]] == [("a", 300_000)]

            page = await http.get("/metrics")
            assert page.headers["content-type"].startswith("text/plain")
            m = _metrics(page.text)
            assert m["cdpfs_journal_last_seq"] == doc["journal"]["last_seq"]
            assert m["cdpfs_written_bytes_total"] == 300_000
            assert m["cdpfs_fsync_seconds_count"] == 1
            assert m["cdpfs_commits_total"] >= 1
            assert m["cdpfs_window_seconds"] >= 0

            # events: made while a follower listens, delivered with consecutive ids
            got: list[dict] = []

            async def follow() -> None:
                async with http.stream("GET", "/api/v1/events") as stream:
                    async for line in stream.aiter_lines():
                        got.append(json.loads(line))
                        if sum(e["kind"] == "bookmark" for e in got) == 2:
                            return

            with trio.fail_after(10):
                async with trio.open_nursery() as inner:
                    inner.start_soon(follow)
                    for name in ("before", "after"):
                        r = await http.post("/api/v1/bookmarks", json={"name": name})
                        assert r.status_code == 201, r.text
                        await trio.sleep(0.3)  # the watcher looks every 0.2 s
            assert got[0]["kind"] == "hello" and got[0]["run"]
            ids = [e["id"] for e in got[1:]]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            marks = [e for e in got if e["kind"] == "bookmark"]
            assert [e["name"] for e in marks] == ["before", "after"]
            actions = [e for e in got if e["kind"] == "action"]
            assert [e["name"] for e in actions] == ["before", "after"]

            # a client that comes back asks for what came after the last id it saw
            r = await http.get(f"/api/v1/events?after={ids[-2]}&follow=0")
            lines = [json.loads(x) for x in r.text.splitlines()]
            assert [e["id"] for e in lines[1:]] == [ids[-1]]

            # a sync replica fsync stopped waiting for: on the node document, as an event
            assert vol.fanout is not None
            vol.fanout.degrade("r9", top)
            about = (await http.get("/api/v1/node")).json()
            assert about["degraded"] == ["r9"] and about["role"] == "primary"
            r = await http.get(f"/api/v1/events?after={ids[-1]}&follow=0")
            assert [json.loads(x)["kind"] for x in r.text.splitlines()[1:]] == \
                ["sync-degraded"]
        nursery.cancel_scope.cancel()


async def test_who_may_read_and_act(tmp_path: Path) -> None:
    path = tmp_path / "vol"
    init_volume(path).close()
    options = ApiOptions("127.0.0.1:0", tokens=_tokens(tmp_path))
    async with served(path) as vol, trio.open_nursery() as nursery:
        url = await nursery.start(serve_api, options, Served(vol, "mount"))
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            mark = {"name": "m"}
            assert (await http.get("/health")).status_code == 200  # no token needed
            r = await http.get("/api/v1/status")
            assert r.status_code == 401 and "token" in r.json()["error"]
            assert (await http.get("/metrics", headers=_bearer("wrong" * 5))).status_code == 401
            assert (await http.get("/metrics", headers=_bearer(VIEWER))).status_code == 200
            r = await http.post("/api/v1/bookmarks", json=mark)
            assert r.status_code == 401
            r = await http.post("/api/v1/bookmarks", json=mark, headers=_bearer(VIEWER))
            assert r.status_code == 403 and "viewer" in r.json()["error"]
            r = await http.post("/api/v1/bookmarks", json=mark,
                                headers={**_bearer(ADMIN), "Origin": "https://evil.example"})
            assert r.status_code == 403 and "another site" in r.json()["error"]
            # a form post (what a page of another site can send without asking)
            r = await http.post("/api/v1/bookmarks", data={"name": "m"},
                                headers=_bearer(ADMIN))
            assert r.status_code == 415
            r = await http.post("/api/v1/bookmarks", content=b"{" * 100_000,
                                headers={**_bearer(ADMIN), "Content-Type": "application/json"})
            assert r.status_code == 413
            r = await http.post("/api/v1/bookmarks", content=b"{not json",
                                headers={**_bearer(ADMIN), "Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == "the body is not JSON"
            r = await http.post("/api/v1/bookmarks", json={"name": "@bad/name"},
                                headers=_bearer(ADMIN))
            assert r.status_code == 400 and "bookmark name" in r.json()["error"]
            r = await http.post("/api/v1/bookmarks", json={"name": "m", "at": "yesterday-ish"},
                                headers=_bearer(ADMIN))
            assert r.status_code == 400
            # none of that made anything; the admin's bookmark is made, once
            r = await http.post("/api/v1/bookmarks", json=mark, headers=_bearer(ADMIN))
            assert r.status_code == 201 and r.json()["name"] == "m"
            r = await http.post("/api/v1/bookmarks", json=mark, headers=_bearer(ADMIN))
            assert r.status_code == 409
            assert (await http.get("/nowhere", headers=_bearer(ADMIN))).status_code == 404

            # a slow request (a head that never ends) costs its own connection only
            host, port = url.removeprefix("http://").rsplit(":", 1)
            slow = await trio.open_tcp_stream(host, int(port))
            await slow.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            huge = await trio.open_tcp_stream(host, int(port))
            await huge.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
            assert (await http.get("/health")).status_code == 200
            with trio.fail_after(5):  # too large a head: answered and closed at once
                answer = await huge.receive_some(4096)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 4")
            await slow.aclose()
            await huge.aclose()
        nursery.cancel_scope.cancel()


async def test_beyond_loopback_without_tls_only_the_health_endpoints_answer(
        tmp_path: Path) -> None:
    """A load balancer's checks are plain HTTP on the node's address; the rest of the
    API needs TLS there, tokens or not."""
    path = tmp_path / "vol"
    init_volume(path).close()
    options = ApiOptions("0.0.0.0:0", tokens=_tokens(tmp_path))
    async with served(path) as vol, trio.open_nursery() as nursery:
        url = await nursery.start(serve_api, options, Served(vol, "mount"))
        port = url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                     headers=_bearer(ADMIN)) as http:
            assert (await http.get("/primary")).status_code == 200
            for r in (await http.get("/api/v1/status"), await http.get("/metrics"),
                      await http.post("/api/v1/bookmarks", json={"name": "m"})):
                assert r.status_code == 403 and "without TLS" in r.json()["error"]
        nursery.cancel_scope.cancel()


def test_the_tokens_file_is_private_and_well_formed(tmp_path: Path) -> None:
    tokens = _tokens(tmp_path)
    tokens.chmod(0o644)
    with pytest.raises(CdpfsError, match="chmod 600"):
        ApiOptions("127.0.0.1:0", tokens=tokens).access()
    tokens.chmod(0o600)
    tokens.write_text("root me short\n")
    with pytest.raises(CdpfsError, match=r"tokens:1: expected 'ROLE NAME TOKEN'"):
        ApiOptions("127.0.0.1:0", tokens=tokens).access()


def test_the_openapi_document_describes_every_route_and_only_those(tmp_path: Path) -> None:
    from starlette.routing import Route

    from cdpfs.api.access import Access
    from cdpfs.api.app import NodeApp
    from cdpfs.api.openapi import document

    class Nothing:  # a source is not read to list the routes
        volume = events = None

    app = NodeApp(Nothing(), Access())  # type: ignore[arg-type]
    routes = {r.path: set(r.methods or ()) - {"HEAD"} for r in app.app.routes
              if isinstance(r, Route) and r.path not in ("/", "/console/nodes")}
    described = {path: {m.upper() for m in ops} for path, ops in document()["paths"].items()}
    assert routes == described
