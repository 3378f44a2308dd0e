"""The high-availability commands: ``cdpfs ha create/join/leave/status/run``.

Every command talks to the cluster's etcd: ``--etcd`` names its members
(``https://host:2379,...``) and ``--etcd-ca/--etcd-cert/--etcd-key`` the files a
node authenticates with (or ``CDPFS_ETCD``, ``CDPFS_ETCD_CA``, ... in the
environment, as a systemd unit would set them).
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import trio

from cdpfs.errors import ClusterError, first_error
from cdpfs.figures import cluster_lag
from cdpfs.ha.cluster import MODES, Cluster, NodeSpec, Settings, check_name
from cdpfs.ha.etcd import Etcd, Tls
from cdpfs.ha.handover import hand_over
from cdpfs.names import shown
from cdpfs.replication import credentials
from cdpfs.replication.protocol import parse_address
from cdpfs.scenario import Scenario, parse_assignments
from cdpfs.scenario import read as read_scenario
from cdpfs.store.lmdb import is_store, volume_id

from .serving import api_from, api_options


def etcd_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--etcd", "endpoints", envvar="CDPFS_ETCD", required=True,
                     metavar="URL,...", help="The etcd members' client URLs."),
        click.option("--etcd-ca", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     envvar="CDPFS_ETCD_CA", help="The CA that signed etcd's certificates."),
        click.option("--etcd-cert", type=click.Path(path_type=Path, exists=True,
                                                    dir_okay=False),
                     envvar="CDPFS_ETCD_CERT", help="This node's client certificate for etcd."),
        click.option("--etcd-key", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     envvar="CDPFS_ETCD_KEY", help="Its key."),
    ]):
        fn = option(fn)
    return fn


def _connection(endpoints: str, ca: Path | None, cert: Path | None,
                key: Path | None) -> tuple[list[str], Tls | None]:
    urls = [u.strip() for u in endpoints.split(",") if u.strip()]
    if not urls:
        raise ClusterError("--etcd: no URL given")
    for url in urls:
        _check_url(url)
    for option, path in (("--etcd-ca", ca), ("--etcd-cert", cert), ("--etcd-key", key)):
        if path is not None and not path.is_file():  # a FIFO would block TLS's reading it
            raise ClusterError(f"{option} {path}: not a regular file")
    given = [x is not None for x in (ca, cert, key)]
    if any(given) and not all(given):
        raise ClusterError("--etcd-ca, --etcd-cert and --etcd-key go together")
    tls = Tls(ca, cert, key) if all(given) else None  # type: ignore[arg-type]
    if tls is None and any(u.startswith("https://") for u in urls):
        raise ClusterError("an https:// etcd needs --etcd-ca, --etcd-cert and --etcd-key")
    return urls, tls


def _check_url(url: str) -> None:
    """ClusterError unless ``url`` is an etcd client URL: http(s)://HOST[:PORT]."""
    why = ""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a port that is no number or out of range raises here
    except ValueError as exc:  # an unclosed [, a port that is not a number ...
        why = str(exc)
    else:
        if parts.scheme not in ("https", "http"):
            why = "it starts with https:// (or http://)"
        elif not parts.hostname:
            why = "it names no host"
    if why:
        raise ClusterError(f"--etcd {url}: not an etcd URL: {why}")


def _with_cluster(conn: tuple[list[str], Tls | None], name: str,
                  fn: Callable[[Cluster], Any]) -> Any:
    async def run() -> Any:
        async with Etcd(conn[0], conn[1]) as etcd:
            return await fn(Cluster(etcd, name))

    try:
        return trio.run(run)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


@click.group("ha")
def ha() -> None:
    """High availability: nodes, the primary role on an etcd lease, failover."""


@ha.command("create")
@click.argument("cluster")
@click.option("--volume", "store", required=True, type=click.Path(path_type=Path),
              help="The store holding the volume now (its node becomes the first primary).")
@click.option("--ttl", default=5, show_default=True, type=click.IntRange(2, 600),
              help="Seconds the primary's lease lives.")
@click.option("--interval", default=1.0, show_default=True,
              help="Seconds between the primary's checks and renewals.")
@click.option("--mode", type=click.Choice(MODES), default="sync", show_default=True,
              help="How the primary ships to the other nodes.")
@click.option("--max-lag", default=0, show_default=True, type=click.IntRange(0, 2**62),
              help="Records an async replica may lack and still be promoted.")
@click.option("--check", "checks", multiple=True, metavar="COMMAND",
              help="An application check the primary runs before each renewal (a shell "
                   "command that must exit 0; repeat for more). A failing one fails over.")
@click.option("--check-timeout", type=float,
              help="Seconds each check may take (default: 2, at most half the ttl).")
@click.option("--scenario", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A scenario file: its [[check]] steps are checks, its [[promote]] and "
                   "[[demote]] steps run when a node gains or gives up the role.")
@click.option("--set", "variables", multiple=True, metavar="KEY=VALUE",
              help="A variable of the scenario, for every node (repeatable).")
@etcd_options
def create_cmd(cluster: str, store: Path, ttl: int, interval: float, mode: str, max_lag: int,
               checks: tuple[str, ...], check_timeout: float | None, scenario: Path | None,
               variables: tuple[str, ...], endpoints: str, etcd_ca: Path | None,
               etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """Make CLUSTER for the volume in STORE."""
    check_name(cluster, "cluster")
    if not is_store(store):
        raise ClusterError(f"{store}: not a cdpfs store")
    uuid = volume_id(store)
    text = ""
    if scenario is not None:
        text = read_scenario(scenario)
        Scenario.parse(text, str(scenario), variables, complete=False)
    settings = Settings(uuid, ttl=ttl, interval=interval, mode=mode, max_lag=max_lag,
                        checks=list(checks),
                        check_timeout=check_timeout or min(2.0, ttl / 2), scenario=text,
                        vars=parse_assignments(variables)).check()
    conn = _connection(endpoints, etcd_ca, etcd_cert, etcd_key)
    _with_cluster(conn, cluster, lambda c: c.create(settings))
    click.echo(f"cluster {cluster} made for volume {uuid}: ttl {ttl}s, checks every "
               f"{interval}s, {mode} replication")


@ha.command("join")
@click.argument("cluster")
@click.argument("node")
@click.option("--store", required=True, type=click.Path(path_type=Path),
              help="The node's store (it may not exist yet on a replica).")
@click.option("--address", required=True, metavar="HOST:PORT",
              help="Where the node's replica server listens.")
@click.option("--mount", "mountpoint", type=click.Path(path_type=Path),
              help="Where the node mounts the volume while it is primary.")
@click.option("--health", metavar="HOST:PORT",
              help="Where the node answers GET /primary, /replica?lag=N, /health.")
@click.option("--set", "variables", multiple=True, metavar="KEY=VALUE",
              help="A variable of the cluster's scenario on this node (repeatable).")
@etcd_options
def join_cmd(cluster: str, node: str, store: Path, address: str, mountpoint: Path | None,
             health: str | None, variables: tuple[str, ...], endpoints: str,
             etcd_ca: Path | None, etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """Add NODE (this machine's store, address, mount point) to CLUSTER."""
    check_name(cluster, "cluster")
    check_name(node, "node")
    parse_address(address)
    if health:
        parse_address(health)
    conn = _connection(endpoints, etcd_ca, etcd_cert, etcd_key)
    cert_path = credentials.tls_dir(store) / "node.crt"
    if not cert_path.exists():
        credentials.keygen(store, node)
    uuid = volume_id(store) if is_store(store) else None
    spec = NodeSpec(node, os.path.realpath(store), address, cert=cert_path.read_text(),
                    mount=os.path.realpath(mountpoint) if mountpoint else "", health=health or "",
                    vars=parse_assignments(variables))

    async def join(c: Cluster) -> None:
        settings = await c.settings()
        if uuid is not None and uuid != settings.volume:
            raise ClusterError(f"{store} holds volume {uuid}, cluster {cluster} volume "
                               f"{settings.volume}")
        settings.hooks(node, spec.vars)  # every variable of the scenario set
        await c.join(spec)

    _with_cluster(conn, cluster, join)
    click.echo(f"node {node} joined cluster {cluster}: store {shown(spec.store)}, replication "
               f"on {address}" + (f", mounts on {shown(spec.mount)}" if spec.mount else ""))


@ha.command("leave")
@click.argument("cluster")
@click.argument("node")
@etcd_options
def leave_cmd(cluster: str, node: str, endpoints: str, etcd_ca: Path | None,
              etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """Take NODE out of CLUSTER (stop its daemon first)."""
    check_name(cluster, "cluster")
    check_name(node, "node")
    conn = _connection(endpoints, etcd_ca, etcd_cert, etcd_key)
    _with_cluster(conn, cluster, lambda c: c.leave(node))
    click.echo(f"node {node} left cluster {cluster}")


@ha.command("status")
@click.argument("cluster")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
@etcd_options
def status_cmd(cluster: str, as_json: bool, endpoints: str, etcd_ca: Path | None,
               etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """The primary, its epoch, and each node's role, position and last report."""
    check_name(cluster, "cluster")
    conn = _connection(endpoints, etcd_ca, etcd_cert, etcd_key)

    async def read(c: Cluster) -> dict[str, Any]:
        settings = await c.settings()
        primary = await c.primary()
        nodes = await c.nodes()
        states = await c.states()
        lags = cluster_lag({n: s.seq for n, s in states.items()})
        now = time.time()
        return {
            "cluster": cluster, "volume": settings.volume, "settings": asdict(settings),
            "primary": primary.node if primary else None,
            "epoch": primary.epoch if primary else None,
            "nodes": {n: {"address": spec.address, "mount": spec.mount,
                          **({"role": states[n].role, "seq": states[n].seq,
                              "lag": lags[n], "synced": states[n].synced,
                              "cannot_serve": states[n].cannot_serve,
                              "reported_ago": round(now - states[n].time, 1)}
                             if n in states else {"role": "unknown"})}
                      for n, spec in sorted(nodes.items())},
        }

    out = _with_cluster(conn, cluster, read)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"cluster {cluster}, volume {out['volume']}: primary "
               + (f"{out['primary']} (epoch {out['epoch']})" if out["primary"] else "none"))
    for n, info in out["nodes"].items():
        line = f"  {n}: {info['role']}"
        if "seq" in info:
            line += (f", at #{info['seq']} (lag {info['lag']} records), "
                     f"reported {info['reported_ago']}s ago")
        click.echo(shown(line + f", replication on {info['address']}"
                         + (f", mount {info['mount']}" if info["mount"] else "")))
        if info.get("cannot_serve"):
            click.echo(shown(f"    cannot serve, so it does not campaign: "
                             f"{info['cannot_serve']}"))


def _hand_over_cmd(cluster: str, node: str, force: bool, timeout: float, endpoints: str,
                   ca: Path | None, cert: Path | None, key: Path | None) -> None:
    check_name(cluster, "cluster")
    check_name(node, "node")
    if not 0 < timeout <= 86400:  # not NaN either
        raise ClusterError(f"--timeout {timeout}: from 0 to 86400 seconds")
    conn = _connection(endpoints, ca, cert, key)
    took = _with_cluster(conn, cluster, lambda c: hand_over(c, node, force, timeout))
    click.echo(f"node {node} is the primary of {cluster} ({took:.1f} s)")


@ha.command("switchover")
@click.argument("cluster")
@click.argument("node")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@etcd_options
def switchover_cmd(cluster: str, node: str, timeout: float, endpoints: str,
                   etcd_ca: Path | None, etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """Hand the primary role to NODE, a caught-up replica: the primary drains (every
    change committed and on every replica), unmounts and gives the role up."""
    _hand_over_cmd(cluster, node, False, timeout, endpoints, etcd_ca, etcd_cert, etcd_key)


@ha.command("promote")
@click.argument("cluster")
@click.argument("node")
@click.option("--force", is_flag=True,
              help="Even if NODE lags: the records it lacks are not on the new primary.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@etcd_options
def promote_cmd(cluster: str, node: str, force: bool, timeout: float, endpoints: str,
                etcd_ca: Path | None, etcd_cert: Path | None, etcd_key: Path | None) -> None:
    """Make NODE the primary (as switchover; --force also when it lags)."""
    _hand_over_cmd(cluster, node, force, timeout, endpoints, etcd_ca, etcd_cert, etcd_key)


@ha.command("run")
@click.argument("cluster")
@click.argument("node")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@etcd_options
@api_options
def run_cmd(cluster: str, node: str, allow_other: bool, endpoints: str,
            etcd_ca: Path | None, etcd_cert: Path | None, etcd_key: Path | None,
            api: str | None, api_tokens: Path | None, api_cert: Path | None,
            api_key: Path | None) -> None:
    """Run NODE's daemon in the foreground: a replica until it wins the primary role,
    the primary (mounted) while it holds it. SIGTERM hands the role on."""
    check_name(cluster, "cluster")
    check_name(node, "node")
    from cdpfs.mount.hanode import run_node

    serving = api_from(api, api_tokens, api_cert, api_key, elsewhere=True)
    urls, tls = _connection(endpoints, etcd_ca, etcd_cert, etcd_key)
    run_node(urls, tls, cluster, node, allow_other=allow_other, api=serving)


COMMANDS = [ha]
