"""A cluster as etcd holds it: its settings, its nodes, the primary role, the epoch.

Keys, under ``/cdpfs/clusters/<name>/``:

- ``settings``: the volume (its uuid), the lease TTL, the check interval, the
  replication mode of replicas, the lag a replica may have and still be
  promoted, the application checks (commands) and their timeout, the scenario
  (a scenario file's text: checks, promote and demote hooks) and its variables;
- ``nodes/<node>``: each node's store, replication address, mount point and TLS
  certificate (etcd is reached over mutual TLS, so a certificate read here is as
  trusted as the cluster: nodes trust each other's from here);
- ``primary``: ``{node, epoch}``, attached to the primary's lease: it disappears
  when etcd lets the lease go, and only then may another node take it;
- ``epoch``: the newest epoch given out (grown by compare-and-set);
- ``state/<node>``: what each node last reported (role, epoch, newest seq, time;
  a primary also the sync replicas every fsync it returned is on; a replica why
  it cannot serve the volume, if it cannot: it does not campaign then);
- ``request``: ``{node, force, time}``, a hand-over asked for by ``ha switchover``
  or ``ha promote``: the primary drains and gives the role up, only that node
  campaigns (``force``: even if it lags), and it removes the request once it
  holds the role. A request older than ``REQUEST_TTL`` is ignored.

Values are JSON. Nothing here decides anything: ``ha.node`` does.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .. import names
from ..errors import CdpfsError, ClusterError
from ..scenario import Scenario, Step
from .etcd import KV, Etcd

ROOT = "/cdpfs/clusters/"
REQUEST_TTL = 30.0  # seconds a hand-over request stands
MODES = ("sync", "async")


def check_name(name: str, what: str) -> str:
    """``name`` if it follows the one name rule (``cdpfs.names``); ClusterError if not."""
    try:
        return names.check_name(name, what)
    except names.BadName as exc:
        raise ClusterError(str(exc)) from None


@dataclass
class Settings:
    volume: str  # the volume's uuid: every node's store must hold it
    ttl: int = 5  # seconds the primary's lease lives without a renewal
    interval: float = 1.0  # seconds between the primary's checks and renewals
    mode: str = "sync"  # how the primary ships to the other nodes
    max_lag: int = 0  # records a replica may lack and still be promoted (async mode)
    checks: list[str] = field(default_factory=list)  # application checks (shell commands)
    check_timeout: float = 2.0  # seconds each check may take
    scenario: str = ""  # a scenario file's text: checks, promote and demote hooks
    vars: dict[str, str] = field(default_factory=dict)  # its variables, for every node

    def check(self) -> Settings:
        if self.mode not in MODES:
            raise ClusterError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        if not 2 <= self.ttl <= 600:
            raise ClusterError(f"ttl {self.ttl}: from 2 to 600 seconds")
        if not 0.05 <= self.interval <= self.ttl / 2:
            raise ClusterError(f"interval {self.interval}: from 0.05 s to half the ttl")
        if self.max_lag < 0:
            raise ClusterError("max_lag: not negative")
        try:
            scenario = Scenario.parse(self.scenario, "the cluster's scenario", complete=False)
        except CdpfsError as exc:
            raise ClusterError(str(exc)) from None
        has_checks = bool(self.checks) or bool(scenario.steps("check"))
        if has_checks and not 0.1 <= self.check_timeout <= self.ttl / 2:
            raise ClusterError(f"check timeout {self.check_timeout}: from 0.1 s to half the ttl")
        return self

    def hooks(self, name: str, node_vars: dict[str, str]) -> Scenario:
        """The cluster's scenario for node ``name`` (its own variables over the
        cluster's), with the ``checks`` as check steps; every check is given at most
        ``check_timeout``: a slower one could outlive the lease."""
        try:
            scenario = Scenario.parse(self.scenario, f"cluster scenario (node {name})",
                                      [f"{k}={v}" for k, v in {**self.vars,
                                                               **node_vars}.items()])
        except CdpfsError as exc:
            raise ClusterError(str(exc)) from None
        checks = [Step(s.run, min(s.timeout, self.check_timeout))
                  for s in scenario.steps("check")]
        checks += [Step(c, self.check_timeout) for c in self.checks]
        return scenario.replace("check", checks)


@dataclass
class NodeSpec:
    name: str
    store: str  # path of the node's store on its machine
    address: str  # host:port its replica server listens on
    cert: str = ""  # the store's TLS certificate (PEM)
    mount: str = ""  # where the primary mounts the volume ("" : no mount)
    health: str = ""  # host:port of its HTTP health endpoint ("" : none)
    vars: dict[str, str] = field(default_factory=dict)  # the scenario's, on this node


@dataclass
class Primary:
    node: str
    epoch: int
    lease: int = 0
    revision: int = 0


@dataclass
class NodeState:
    role: str  # replica, primary, fenced, stopped
    epoch: int
    seq: int
    time: float = field(default_factory=time.time)
    # a primary's sync replicas that every returned fsync is on (None: not known);
    # one leaves this list before an fsync returns without it
    synced: list[str] | None = None
    # why the node's front end cannot serve the volume (its mount point is not an
    # empty directory, ...): it does not campaign while this is set
    cannot_serve: str | None = None


class Cluster:
    """One cluster's keys in etcd."""

    def __init__(self, etcd: Etcd, name: str) -> None:
        self.etcd = etcd
        self.name = check_name(name, "cluster")
        self.prefix = f"{ROOT}{name}/"

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    async def _json(self, key: str) -> tuple[Any, KV] | None:
        kv = await self.etcd.get(key)
        if kv is None:
            return None
        try:
            return json.loads(kv.value), kv
        except ValueError:
            raise ClusterError(f"{key}: not JSON in etcd") from None

    # --- settings and nodes ----------------------------------------------------------

    async def create(self, settings: Settings) -> None:
        settings.check()
        body = json.dumps(asdict(settings)).encode()
        if not await self.etcd.swap(self.key("settings"), body):
            raise ClusterError(f"cluster {self.name} exists already")

    async def settings(self) -> Settings:
        got = await self._json(self.key("settings"))
        if got is None:
            raise ClusterError(f"no cluster {self.name} (make it with 'cdpfs ha create')")
        return Settings(**got[0])

    async def join(self, spec: NodeSpec) -> None:
        check_name(spec.name, "node")
        await self.settings()
        await self.etcd.put(self.key("nodes", spec.name), json.dumps(asdict(spec)).encode())

    async def leave(self, name: str) -> None:
        if not await self.etcd.delete(self.key("nodes", name)):
            raise ClusterError(f"cluster {self.name} has no node {name!r}")
        await self.etcd.delete(self.key("state", name))

    async def nodes(self) -> dict[str, NodeSpec]:
        out = {}
        for kv in await self.etcd.get_prefix(self.key("nodes", "")):
            spec = NodeSpec(**json.loads(kv.value))
            out[spec.name] = spec
        return out

    async def node(self, name: str) -> NodeSpec:
        got = await self._json(self.key("nodes", name))
        if got is None:
            known = ", ".join(sorted(await self.nodes())) or "none"
            raise ClusterError(f"cluster {self.name} has no node {name!r} (nodes: {known})")
        return NodeSpec(**got[0])

    # --- the role and the epoch -------------------------------------------------------

    async def primary(self) -> Primary | None:
        got = await self._json(self.key("primary"))
        if got is None:
            return None
        value, kv = got
        return Primary(value["node"], int(value["epoch"]), kv.lease, kv.mod_revision)

    async def next_epoch(self, floor: int = 0) -> int:
        """A new epoch, newer than every one given out before (and than ``floor``)."""
        while True:
            got = await self._json(self.key("epoch"))
            current, rev = (int(got[0]), got[1].mod_revision) if got else (0, 0)
            epoch = max(current, floor) + 1
            if await self.etcd.swap(self.key("epoch"), str(epoch).encode(), mod_revision=rev):
                return epoch

    # --- hand-over requests ---------------------------------------------------------------

    async def request(self) -> dict[str, Any] | None:
        """The standing hand-over request, if any (one older than REQUEST_TTL is none)."""
        got = await self._json(self.key("request"))
        if got is None:
            return None
        value = got[0]
        if time.time() - float(value.get("time", 0)) > REQUEST_TTL:
            return None
        return value

    async def ask(self, node: str, force: bool = False) -> None:
        await self.etcd.put(self.key("request"), json.dumps(
            {"node": node, "force": force, "time": time.time()}).encode())

    async def clear_request(self) -> None:
        await self.etcd.delete(self.key("request"))

    # --- what nodes report --------------------------------------------------------------

    async def report(self, name: str, state: NodeState) -> None:
        await self.etcd.put(self.key("state", name), json.dumps(asdict(state)).encode())

    async def states(self) -> dict[str, NodeState]:
        out = {}
        known = {f.name for f in fields(NodeState)}
        for kv in await self.etcd.get_prefix(self.key("state", "")):
            # a newer node's report may say more: what this one knows is read
            value = {k: v for k, v in json.loads(kv.value).items() if k in known}
            out[kv.key.rsplit("/", 1)[1]] = NodeState(**value)
        return out
