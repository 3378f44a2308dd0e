"""The node API of real processes, read by the tools operators run.

A mounted primary (``cdpfs mount --api``) ships to a replica server (``cdpfs
replica serve --api``) on loopback. Debian's ``promtool`` checks both metrics
pages; Debian's ``prometheus`` scrapes the primary every second with a viewer
token, and its query API returns the replica's lag as the node reports it: 0,
then the records written while the replica server is down, then 0 again once it
is back. An event follower sees the replica lost, connected and caught up, with
consecutive ids. Every process is killed and every mount unmounted at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import (
    Procs,
    ReplicaServer,
    Volume,
    cdpfs,
    free_port,
    pair_stores,
    stop_process,
    wait_replicated,
    wait_until,
)

VIEWER = "viewer-token-for-prometheus"
ADMIN = "admin-token-for-the-test-0"

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs Debian's prometheus (contrib/setup.sh)")


def _tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"viewer prometheus {VIEWER}\nadmin ops {ADMIN}\n")
    path.chmod(0o600)
    return path


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


class Prometheus:
    """Debian's prometheus scraping ``target`` every second with a bearer token."""

    def __init__(self, tmp_path: Path, target: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        secret = tmp_path / "prom.token"
        secret.write_text(token)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: cdpfs\n"
            f"    authorization: {{credentials_file: {secret}}}\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        try:
            result = self.query(expr)
        except httpx.HTTPError:
            return None
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.proc)


class Events:
    """A follower of a node's events in a thread."""

    def __init__(self, url: str, token: str) -> None:
        self.got: list[dict] = []
        self.since = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(url, token), daemon=True)
        self._thread.start()

    def _run(self, url: str, token: str) -> None:
        try:
            with httpx.stream("GET", f"{url}/api/v1/events", timeout=None,
                              headers={"Authorization": f"Bearer {token}"}) as stream:
                for line in stream.iter_lines():
                    self.got.append(json.loads(line))
        except httpx.HTTPError:  # the node stopped (the end of the test)
            pass

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.got]


@pytest.fixture
def nodes(make_volume: type[Volume], tmp_path: Path
          ) -> Iterator[tuple[Volume, ReplicaServer, str, str]]:
    """A primary mounted with its API, shipping to a replica server with its API."""
    vol = make_volume("primary").init()
    replica = tmp_path / "replica.store"
    pair_stores(vol.store, replica)
    procs = Procs()
    server = ReplicaServer(replica, tmp_path / "serve.log", procs=procs)
    tokens = _tokens(tmp_path)
    papi, rapi = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    try:
        server.start("--api", rapi, "--api-tokens", str(tokens))
        cdpfs("replica", "add", vol.store, "r1", "--address", server.address)
        vol.mount("--api", papi, "--api-tokens", str(tokens))
        yield vol, server, f"http://{papi}", f"http://{rapi}"
    finally:
        procs.kill_all()
        vol.cleanup()


def test_prometheus_scrapes_the_lag_the_node_reports(nodes: tuple[Volume, ReplicaServer, str, str],
                                                     tmp_path: Path) -> None:
    vol, server, primary, replica = nodes
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    (vol.mnt / "a").write_bytes(b"a" * 100_000)
    wait_replicated(vol, server.store)

    # load balancers: each node answers for its own role
    assert httpx.get(f"{primary}/primary").status_code == 200
    assert httpx.get(f"{replica}/primary").status_code == 503
    assert httpx.get(f"{replica}/replica").status_code == 200
    assert httpx.get(f"{primary}/metrics").status_code == 401  # tokens are set

    for url in (primary, replica):
        page = httpx.get(f"{url}/metrics", headers=viewer).text
        check = subprocess.run(["promtool", "check", "metrics"], input=page, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

    events = Events(primary, VIEWER)
    prom = Prometheus(tmp_path, primary.removeprefix("http://"), VIEWER)
    try:
        lag = 'cdpfs_replica_lag_records{replica="r1"}'
        wait_until(lambda: prom.value(lag) == 0.0, timeout=60, what="prometheus to scrape 0")

        server.kill()  # the replica goes away; the primary writes on
        for i in range(20):
            (vol.mnt / f"f{i}").write_bytes(b"x" * 10_000)
        vol.sync()

        def node_lag() -> float | None:
            page = httpx.get(f"{primary}/metrics", headers=viewer).text
            return _sample(page, "cdpfs_replica_lag_records", replica="r1")

        wait_until(lambda: (node_lag() or 0) >= 20, what="the node to report the lag")
        reported = node_lag()
        wait_until(lambda: prom.value(lag) == reported, timeout=30,
                   what=f"prometheus to return the node's lag {reported}")
        seconds = prom.value('cdpfs_replica_lag_seconds{replica="r1"}')
        assert seconds is not None and 0 < seconds < 60
        assert prom.value('cdpfs_replica_connected{replica="r1"}') == 0.0

        server.start("--api", replica.removeprefix("http://"), "--api-tokens",
                     str(tmp_path / "tokens"))
        wait_until(lambda: prom.value(lag) == 0.0, timeout=60,
                   what="prometheus to see the replica caught up")
        assert prom.value('cdpfs_replica_connected{replica="r1"}') == 1.0
        assert prom.value("cdpfs_written_bytes_total") == 100_000 + 20 * 10_000
        # the follower, connected for well over 10 s without a word, still gets events
        time.sleep(max(0.0, events.since + 12 - time.monotonic()))
        httpx.post(f"{primary}/api/v1/bookmarks", json={"name": "late"},
                   headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
        wait_until(lambda: "late" in [e.get("name") for e in events.got],
                   what="an event on a stream over 10 s old")
    finally:
        prom.stop()
    wait_until(lambda: "replica-caught-up" in events.kinds()[
        events.kinds().index("replica-lost") if "replica-lost" in events.kinds() else 0:],
        what="the caught-up event")
    kinds = events.kinds()
    assert kinds[0] == "hello"
    lost = kinds.index("replica-lost")
    assert "replica-connected" in kinds[lost:] and "replica-caught-up" in kinds[lost:]
    ids = [e["id"] for e in events.got[1:]]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert all(e["replica"] == "r1" for e in events.got if e["kind"].startswith("replica-"))
    assert not vol.problems()


def test_the_status_document_of_the_command_line_and_the_api_agree(
        nodes: tuple[Volume, ReplicaServer, str, str]) -> None:
    vol, server, primary, _ = nodes
    (vol.mnt / "a").write_bytes(b"a" * 1000)
    wait_replicated(vol, server.store)
    time.sleep(0.5)  # the sender saves the replica's state now and then
    api = httpx.get(f"{primary}/api/v1/status",
                    headers={"Authorization": f"Bearer {VIEWER}"}).json()
    cli = json.loads(cdpfs("status", "--json", vol.store).stdout)
    for doc in (api, cli):
        assert doc["format"] == 1 and doc["store"] == str(vol.store)
        assert doc["in_use_by"].startswith("mount on ")
    assert api["journal"] == cli["journal"]
    assert [r["name"] for r in api["replicas"]] == [r["name"] for r in cli["replicas"]] \
        == ["r1"]
    assert api["replicas"][0]["acked"] == cli["replicas"][0]["acked"] == \
        cli["journal"]["last_seq"]


def test_a_file_restored_through_the_api_is_back_on_the_mount(
        nodes: tuple[Volume, ReplicaServer, str, str]) -> None:
    vol, _, primary, replica = nodes
    admin = {"Authorization": f"Bearer {ADMIN}"}
    (vol.mnt / "docs").mkdir()
    (vol.mnt / "docs" / "a.txt").write_text("the good version\n")
    r = httpx.post(f"{primary}/api/v1/bookmarks", json={"name": "good"}, headers=admin)
    assert r.status_code == 201, r.text
    (vol.mnt / "docs" / "a.txt").write_text("a mistake\n")
    (vol.mnt / "outside").write_text("not to be touched\n")

    for bad in ("../outside", "docs/../../etc", "@-1m/docs", "/", 7):
        r = httpx.post(f"{primary}/api/v1/restore", json={"path": bad, "at": "good"},
                       headers=admin)
        assert r.status_code == 400 and "\n" not in r.json()["error"], r.text
    r = httpx.post(f"{primary}/api/v1/restore", json={"path": "docs/a.txt", "at": "never"},
                   headers=admin)
    assert r.status_code == 400
    r = httpx.post(f"{primary}/api/v1/restore",
                   json={"path": "docs/a.txt", "at": "good"},
                   headers={"Authorization": f"Bearer {VIEWER}"})
    assert r.status_code == 403
    assert (vol.mnt / "docs" / "a.txt").read_text() == "a mistake\n"

    r = httpx.post(f"{primary}/api/v1/restore", json={"path": "docs/a.txt", "at": "good"},
                   headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["files_written"] == 1
    assert (vol.mnt / "docs" / "a.txt").read_text() == "the good version\n"
    assert (vol.mnt / "outside").read_text() == "not to be touched\n"
    # a replica server offers no restore; the mount goes on serving
    r = httpx.post(f"{replica}/api/v1/restore", json={"path": "docs/a.txt", "at": "good"},
                   headers=admin)
    assert r.status_code == 409 and "replica server" in r.json()["error"]
    assert httpx.get(f"{primary}/health").status_code == 200
