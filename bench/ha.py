"""Failover benchmarks (issue 12): how long the volume is unwritable, and what is lost.

Each trial makes a fresh two-node cluster (``bench/hacluster.py``: two ``cdpfs ha
run`` daemons with their mounts, a 3-member etcd with TLS, loopback), starts a
writer that writes and fsyncs a small numbered file every 20 ms through whichever
node's health endpoint says ``/primary`` is 200, lets it run for a second, then
applies the fault to the primary:

- ``kill``: SIGKILL of the primary's daemon (its mount dies with it);
- ``stop``: SIGSTOP of the primary's daemon for twice the TTL, then SIGCONT;
- ``switchover``: ``cdpfs ha switchover`` to the replica (planned);
- ``kill-async``: SIGKILL as ``kill``, with the replica in async mode: the
  acknowledged writes the new primary lacks are what async mode loses.

Figures per kind, over ``--trials`` trials: the failover time, from the fault to
the first write+fsync acknowledged by the other node (p50, p99, max); for
switchover the command's own time and the longest gap between acknowledged
writes; acknowledged writes missing from the new primary afterwards (every file
read back; sync mode: the target is 0); writes acknowledged by the old primary
after the fault, or for a switchover after the new primary's first (the target
is 0). Targets from the issue:
unplanned failover p99 <= 8 s, switchover <= 2 s. Default TTL 5 s and interval
1 s, the product's defaults.

Usage: ``python bench/ha.py [--trials N] [--ttl S] [--interval S] [--markdown FILE]
[--dir DIR] [--keep]`` (root: FUSE). Everything is stopped and unmounted on the way
out.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from etcdcluster import EtcdCluster
from hacluster import HaNodes, Writer, mounted
from harness import Procs, cdpfs, force_unmount, percentile, wait_until
from run import Figure as Row
from run import git_version, report_figures, start_run, work_dir

log = logging.getLogger("bench.ha")

KINDS = ("kill", "stop", "switchover", "kill-async")


@dataclass
class Trial:
    kind: str
    failover: float | None = None  # s from the fault to the first ack on the other node
    command: float | None = None  # switchover: the command's own time
    pause: float | None = None  # longest gap between acks around the fault
    lost: int = 0  # acknowledged writes missing on the new primary
    zombie: int = 0  # acks by the old primary after the fault


def trial(work: Path, etcd: EtcdCluster, kind: str, n: int, ttl: int,
          interval: float) -> Trial:
    base = work / f"{kind}{n}"
    base.mkdir()
    procs = Procs()
    mode = "async" if kind.endswith("-async") else "sync"
    nodes = HaNodes(base, etcd, procs, ttl=ttl, interval=interval, cluster=f"b-{kind}-{n}",
                    mode=mode)
    result = Trial(kind)
    try:
        nodes.start_primary_and_replica()
        writer = Writer(nodes)
        writer.start()
        time.sleep(1.0)
        a = nodes.daemons["a"]
        fault = time.monotonic()
        if kind.startswith("kill"):
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            force_unmount(nodes.mnt("a"))
        elif kind == "stop":
            a.send_signal(signal.SIGSTOP)
        else:
            took = time.monotonic()
            cdpfs("ha", "switchover", nodes.cluster, "b", env=nodes.env)
            result.command = time.monotonic() - took
        wait_until(lambda: any(node == "b" for _, node, _ in writer.acks), timeout=60,
                   what="a write acknowledged by b")
        if kind == "stop":
            time.sleep(max(0.0, fault + 2 * ttl - time.monotonic()))
            a.send_signal(signal.SIGCONT)
            wait_until(lambda: not mounted(nodes.mnt("a")), timeout=30, what="a unmounted")
        time.sleep(0.5)
        writer.finish()
        acks = sorted(writer.acks, key=lambda x: x[2])
        first_b = min(t for _, node, t in acks if node == "b")
        result.failover = first_b - fault
        times = [t for _, _, t in acks]
        around = [t for t in times if fault - 1 <= t <= first_b + 0.5]
        result.pause = max((b - a_ for a_, b in itertools.pairwise(around)), default=None)
        # acks by the old primary once it may no longer give them: after the fault (a
        # killed or stopped daemon), after the new primary's first (a switchover)
        since = first_b if kind == "switchover" else fault + 0.05
        result.zombie = sum(1 for _, node, t in acks if node == "a" and t > since)
        result.lost = len(writer.missing(nodes.mnt("b")))
    finally:
        for proc in nodes.daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        nodes.cleanup()
    log.info("%s #%d: failover %.2f s, pause %s, lost %d, acked by the old primary after "
             "the fault %d%s", kind, n, result.failover or -1,
             f"{result.pause:.2f} s" if result.pause else "-", result.lost, result.zombie,
             f", command {result.command:.2f} s" if result.command else "")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials per fault kind")
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--markdown", type=Path)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    start_run(args.verbose, args.dir)
    rows: list[Row] = []
    errors: list[str] = []
    with work_dir(args.dir, args.keep, "cdpfs-ha-") as work:
        etcd = EtcdCluster(work / "etcd")
        try:
            etcd.start()
            for kind in args.kinds.split(","):
                trials = []
                for n in range(args.trials):
                    try:
                        trials.append(trial(work, etcd, kind, n, args.ttl, args.interval))
                    except Exception as exc:  # one failed trial is reported, not fatal
                        log.error("%s #%d: %s", kind, n, exc)
                        errors.append(f"{kind} #{n}: {exc}")
                times = [t.failover for t in trials if t.failover is not None]
                if not times:
                    continue
                unplanned = kind != "switchover"
                rows.append(Row(kind, "failover p50 (fault -> first ack on the new primary)",
                                "s", statistics.median(times)))
                rows.append(Row(kind, "failover p99", "s", percentile(times, 0.99),
                                value_below=8.0 if unplanned else 2.0))
                rows.append(Row(kind, "failover max", "s", max(times)))
                pauses = [t.pause for t in trials if t.pause is not None]
                if pauses:
                    rows.append(Row(kind, "longest gap between acknowledged writes", "s",
                                    max(pauses)))
                if not unplanned:
                    rows.append(Row(kind, "switchover command, p50", "s",
                                    statistics.median(t.command or 0 for t in trials)))
                if kind.endswith("-async"):  # measured: async mode promises no bound
                    rows.append(Row(kind, "acknowledged writes lost per failover (async "
                                    "mode), mean", "writes",
                                    statistics.mean(t.lost for t in trials)))
                    rows.append(Row(kind, "acknowledged writes lost per failover, max",
                                    "writes", max(t.lost for t in trials)))
                else:
                    rows.append(Row(kind, "acknowledged writes lost (sync mode)", "writes",
                                    sum(t.lost for t in trials), value_below=1))
                rows.append(Row(kind, "writes acknowledged by the old primary after the "
                                "fault", "writes", sum(t.zombie for t in trials),
                                value_below=1))
        finally:
            etcd.close()
    desc = (f"cdpfs failover benchmark\ncdpfs: {git_version()}\n"
            f"{args.trials} trials per kind, ttl {args.ttl} s, interval {args.interval} s, "
            "two nodes and a 3-member etcd on loopback, sync mode (kill-async: async)")
    report_figures(desc, rows, [], errors, args.markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
