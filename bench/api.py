"""Node API benchmarks (issue 21): what serving and scraping the API costs, how fast
it answers and how soon events arrive.

Everything runs through the real command line on loopback: ``cdpfs mount --api``,
``cdpfs replica serve``, an httpx client.

1. **write path, API on and scraped, against off**: the same volume mounted
   without the API and with it, ``/metrics`` and ``/api/v1/status`` fetched every
   second meanwhile, in alternating rounds: 2,000 4 KiB file creates (then a
   sync) and 4,000 random 4 KiB writes into a 64 MiB file (an fsync every 16).
   The median of the rounds each way. Target: on/off >= 0.97 for both rows.
2. **/metrics latency**: a volume with 10 registered replicas, each a running
   ``cdpfs replica serve`` that has caught up, scraped 10 times a second for
   ``--seconds`` (30; 10 with ``--quick``) while a writer appends 4 KiB with an
   fsync 20 times a second; p50 and p99 of the scrape's wall time.
3. **event delivery**: a follower of ``/api/v1/events``; bookmarks made through
   the API (``POST /api/v1/bookmarks``) 5 times a second; for each, the time
   from the POST's start until the follower has its ``action`` event (emitted
   by the request itself) and its ``bookmark`` event (noticed in the store by
   the volume's watcher, which looks every 0.2 s). p50 and p99.

Usage: ``python bench/api.py [--quick] [--rounds N] [--seconds S] [--markdown FILE]
[--dir DIR] [--keep] [-v]`` as root. Every mount and server is stopped and the work
directory removed on the way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from harness import (
    Procs,
    ReplicaServer,
    Volume,
    cdpfs,
    force_unmount,
    free_port,
    pair_stores,
    percentile,
    wait_until,
)
from run import (
    Figure,
    create_files,
    git_version,
    random_writes,
    report_figures,
    start_run,
    work_dir,
)

log = logging.getLogger("api")
TOKEN = "bench-admin-token-0123456789"
MiB = 1 << 20


def _tokens(work: Path) -> Path:
    path = work / "tokens"
    path.write_text(f"admin bench {TOKEN}\n")
    path.chmod(0o600)
    return path


class Scraper:
    """Fetch ``paths`` of ``url`` every ``every`` seconds in a thread; the latencies."""

    def __init__(self, url: str, paths: list[str], every: float) -> None:
        self.url, self.paths, self.every = url, paths, every
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as http:
            due = time.monotonic()
            while not self._stop.is_set():
                for path in self.paths:
                    t0 = time.perf_counter()
                    try:
                        ok = http.get(path).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.times.append(time.perf_counter() - t0)
                    self.failures += not ok
                due += self.every
                self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def write_path(work: Path, rounds: int, rows: list[Figure], notes: list[str]) -> None:
    vol = Volume(work, "wp").init()
    text = (b"the quick brown fox jumps over the lazy dog " * 100)[:4096] * 64
    times: dict[tuple[str, bool], list[float]] = {}
    tokens = _tokens(work)
    for r in range(rounds):
        for api in (False, True) if r % 2 == 0 else (True, False):
            address = f"127.0.0.1:{free_port()}"
            vol.mount(*(["--api", address, "--api-tokens", str(tokens)] if api else []))
            scraper = Scraper(f"http://{address}", ["/metrics", "/api/v1/status"], 1.0) \
                if api else None
            try:
                time.sleep(1.0 if api else 0)
                d = vol.mnt / f"r{r}{int(api)}"
                times.setdefault(("create", api), []).append(
                    2000 / create_files(d, 2000, text))
                big = vol.mnt / f"big{r}{int(api)}"
                with open(big, "wb") as f:
                    f.truncate(64 * MiB)
                rnd = random.Random(r)
                offsets = [rnd.randrange(0, 64 * MiB // 4096) * 4096 for _ in range(4000)]
                src = os.urandom(4000 * 4096)
                times.setdefault(("random", api), []).append(
                    4000 / random_writes(big, offsets, src, 16))
            finally:
                if scraper is not None:
                    scraper.stop()
                    if scraper.failures:
                        notes.append(f"write path: {scraper.failures} scrapes failed")
                vol.umount()
    for row, name, unit in (("create", "4 KiB file creates", "files/s"),
                            ("random", "random 4 KiB writes, fsync every 16", "writes/s")):
        on, off = statistics.median(times[(row, True)]), statistics.median(times[(row, False)])
        rows.append(Figure("write path", f"{name}, API on and scraped 1/s", unit, on, off,
                           "API off", "on/off", ratio_min=0.97,
                           note=f"median of {rounds} alternating rounds; on "
                           f"{[round(x) for x in times[(row, True)]]}, off "
                           f"{[round(x) for x in times[(row, False)]]}"))


def metrics_latency(work: Path, seconds: float, rows: list[Figure], notes: list[str]) -> None:
    vol = Volume(work, "ml").init()
    procs = Procs()
    servers = []
    address = f"127.0.0.1:{free_port()}"
    try:
        for i in range(10):
            replica = work / f"r{i}.store"
            pair_stores(vol.store, replica, down=f"r{i}")
            server = ReplicaServer(replica, work / f"r{i}.log", procs=procs).start()
            servers.append(server)
            cdpfs("replica", "add", vol.store, f"r{i}", "--address", server.address)
        vol.mount("--api", address, "--api-tokens", str(_tokens(work)))
        (vol.mnt / "seed").write_bytes(os.urandom(8 * MiB))
        vol.sync()
        top = vol.last_seq()
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def caught_up() -> bool:
            doc = httpx.get(f"http://{address}/api/v1/status", headers=headers).json()
            return len(doc["replicas"]) == 10 and all(r["acked"] >= top
                                                      for r in doc["replicas"])

        wait_until(caught_up, timeout=120, what="10 replicas caught up")
        stop = threading.Event()

        def writer() -> None:
            fd = os.open(vol.mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                while not stop.wait(0.05):
                    os.write(fd, os.urandom(4096))
                    os.fsync(fd)
            finally:
                os.close(fd)

        w = threading.Thread(target=writer)
        w.start()
        scraper = Scraper(f"http://{address}", ["/metrics"], 0.1)
        time.sleep(seconds)
        scraper.stop()
        stop.set()
        w.join()
        ms = [t * 1000 for t in scraper.times]
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            rows.append(Figure("/metrics, 10 replicas, 10 scrapes/s, a writer beside",
                               f"scrape latency {name}", "ms", percentile(ms, q),
                               note=f"{len(ms)} scrapes, {scraper.failures} failed"
                               if name == "p99" else ""))
    finally:
        procs.kill_all()
        force_unmount(vol.mnt)
        del servers


def event_delivery(work: Path, n: int, rows: list[Figure], notes: list[str]) -> None:
    vol = Volume(work, "ev").init()
    address = f"127.0.0.1:{free_port()}"
    vol.mount("--api", address, "--api-tokens", str(_tokens(work)))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    seen: dict[tuple[str, str], float] = {}
    ready = threading.Event()

    def follow() -> None:
        # A plain socket, as curl reads it: nothing between the stream and the clock.
        # Each event is one HTTP chunk: its size line, then the JSON line.
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: {address}\r\n"
                         f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
            buf = b""
            while data := sock.recv(65536):
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"{"):
                        continue
                    event = json.loads(line)
                    ready.set()
                    name = event.get("name")
                    if event["kind"] in ("action", "bookmark") and name:
                        seen[(event["kind"], name)] = time.perf_counter()

    try:
        threading.Thread(target=follow, daemon=True).start()
        ready.wait(10)
        sent: dict[str, float] = {}
        with httpx.Client(headers=headers, timeout=10) as http:
            for i in range(n):
                name = f"m{i}"
                sent[name] = time.perf_counter()
                http.post(f"http://{address}/api/v1/bookmarks", json={"name": name})
                time.sleep(0.2)
        time.sleep(1.0)
        for kind, how in (("action", "emitted by the request"),
                          ("bookmark", "noticed by the store watcher")):
            ms = [(seen[(kind, k)] - t) * 1000 for k, t in sent.items() if (kind, k) in seen]
            missing = n - len(ms)
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                rows.append(Figure("event delivery, POST to follower",
                                   f"{kind} event ({how}) {name}", "ms",
                                   percentile(ms, q) if ms else None,
                                   note=f"{len(ms)} events, {missing} missing"
                                   if name == "p99" else ""))
    finally:
        vol.umount()  # the follower's connection ends with it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the cdpfs node API")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    start_run(args.verbose, args.dir)
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    rounds = 3 if args.quick else args.rounds
    rows: list[Figure] = []
    notes: list[str] = []
    errors: list[str] = []
    with work_dir(args.dir, args.keep, "cdpfs-api-") as work:
        for name, section in (("write", lambda d: write_path(d, rounds, rows, notes)),
                              ("metrics", lambda d: metrics_latency(d, seconds, rows, notes)),
                              ("events", lambda d: event_delivery(d, 50, rows, notes))):
            d = work / name
            d.mkdir()
            try:
                section(d)
            except (Exception, subprocess.SubprocessError) as exc:
                log.exception("section %s", name)
                errors.append(f"{name}: {exc}")
    desc = (f"cdpfs node API benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"{git_version()}\n{platform.node()}: {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end")
    report_figures(desc, rows, notes, errors, args.markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
