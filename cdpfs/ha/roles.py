"""A store's role: made the primary of a new epoch, or made a replica again.

The node daemon (``ha.node``) does both on a cluster's decisions; the manual
(static) mode without etcd does them by hand (``cdpfs replica promote`` and
``demote``). Promoting marks the store live, starts an epoch newer than every
one it has seen (so the replicas that follow it refuse the old primary) and
registers the given replicas; demoting marks it a replica and forgets its
replicas (a store that served as the primary would otherwise ship to them as a
chain and take over their sessions).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import StoreError
from ..replication import registry
from ..replication.receiver import ROLE_REPLICA
from ..replication.registry import ReplicaState
from ..store import epochs
from ..store.lmdb import Store

ROLE_LIVE = "live"


def promote(path: Path, epoch: int | None = None,
            replicas: Iterable[tuple[str, str, str]] = ()) -> int:
    """Make the store at ``path`` the live one of ``epoch`` (default: one newer than
    every epoch it has seen), shipping to ``replicas`` (name, address, mode);
    the epoch it starts. StoreLocked while a mount or a replica server has it."""
    with Store(path) as store:
        store.lock("promote")
        with store.txn(write=True) as txn:
            epoch = epoch if epoch is not None else epochs.seen(store, txn) + 1
            try:
                epochs.begin(store, txn, epoch)
            except ValueError as exc:
                raise StoreError(f"{path}: {exc}") from None
            store.set_config(txn, "role", ROLE_LIVE)
            for name, address, mode in replicas:
                state = registry.get(store, txn, name) or ReplicaState(name, address, mode)
                state.address, state.mode = address, mode
                registry.put(store, txn, state)
    return epoch


def demote(path: Path) -> list[str]:
    """Make the store at ``path`` a replica that ships nowhere; the replicas it forgot.
    StoreLocked while a mount or a replica server has it."""
    with Store(path) as store:
        store.lock("demote")
        with store.txn(write=True) as txn:
            store.set_config(txn, "role", ROLE_REPLICA)
            forgot = []
            for state in registry.states(store, txn):
                registry.delete(store, txn, state.name)
                forgot.append(state.name)
    return forgot


def role(path: Path) -> str:
    """``live`` or ``replica`` (a store never given a role is live)."""
    with Store(path, readonly=True) as store, store.txn() as txn:
        return str(store.config(txn, "role") or ROLE_LIVE)
