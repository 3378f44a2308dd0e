"""Handing the primary role to a chosen node: ``cdpfs ha switchover`` and ``promote``,
and the node API's switchover.

The request goes through etcd (``Cluster.ask``): the primary sees it, drains
(every change committed and on every replica), unmounts and lets the role go;
the chosen node takes it. Without a primary, the chosen node campaigns at once.
"""

from __future__ import annotations

import time

import trio

from ..errors import ClusterError
from .cluster import Cluster


async def hand_over(c: Cluster, node: str, force: bool, timeout: float) -> float:
    """Ask for the role to go to ``node``; seconds until it holds it."""
    nodes = await c.nodes()
    if node not in nodes:
        raise ClusterError(f"cluster {c.name} has no node {node!r} (nodes: "
                           f"{', '.join(sorted(nodes)) or 'none'})")
    primary = await c.primary()
    if primary is not None and primary.node == node:
        raise ClusterError(f"node {node} is the primary already (epoch {primary.epoch})")
    states = await c.states()
    state = states.get(node)
    if state is None or state.role != "replica":
        raise ClusterError(f"node {node} is not running as a replica "
                           f"({state.role if state else 'no report'}): start its daemon")
    if state.cannot_serve:
        raise ClusterError(f"node {node} cannot serve the volume: {state.cannot_serve}")
    top = max(s.seq for s in states.values())
    # With a primary there, it drains until the target has everything before it lets
    # the role go; without one, a target that lags would lose what it lacks.
    if primary is None and state.seq < top and not force:
        raise ClusterError(f"node {node} is {top - state.seq} records behind: wait until it "
                           "has caught up, or promote it with --force (losing those records)")
    started = time.monotonic()
    await c.ask(node, force)
    try:
        with trio.fail_after(timeout):
            while True:
                holder = await c.primary()
                if holder is not None and holder.node == node:
                    return time.monotonic() - started
                await trio.sleep(0.05)
    except trio.TooSlowError:
        await c.clear_request()
        raise ClusterError(f"node {node} did not take the role within {timeout:.0f} s "
                           "(the request is withdrawn)") from None
