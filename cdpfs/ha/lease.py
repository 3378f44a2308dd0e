"""A lease this node holds on etcd, and until when it may act on it.

etcd counts a lease's TTL from when it handles the grant or renewal, which is
after this node sent it; so the lease surely lives at least until the send time
plus the TTL. ``Lease.valid_until`` is that instant, on the boot clock (it goes on
counting while the process is stopped or the machine frozen), less a margin for
the rate at which the two clocks may drift apart and for the time it takes to
refuse a write already under way. A primary acknowledges nothing once it has
passed, whether or not a renewal is on its way: the rest of the cluster may by
then have let the lease go and promoted another node.

``claim`` is the compare-and-set that makes the holder of a lease the holder of
a role: the key is created only if nobody holds it, attached to the lease, so it
disappears when etcd lets the lease expire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..system import boot_clock
from .etcd import KV, Etcd

log = logging.getLogger(__name__)

DRIFT = 0.05  # the share of a TTL two clocks may disagree by (etcd's own guidance: small)
MARGIN = 0.25  # seconds kept back for a write under way when the deadline passes


class Lease:
    """A granted lease: ``renew`` keeps it, ``valid`` says whether it surely still holds."""

    def __init__(self, etcd: Etcd, lease_id: int, ttl: int, sent: float,
                 clock: Callable[[], float] = boot_clock) -> None:
        self.etcd = etcd
        self.id = lease_id
        self.ttl = ttl
        self.clock = clock
        self.valid_until = self._deadline(sent, ttl)

    @classmethod
    async def grant(cls, etcd: Etcd, ttl: int,
                    clock: Callable[[], float] = boot_clock) -> Lease:
        sent = clock()
        lease_id = await etcd.grant(ttl)
        return cls(etcd, lease_id, ttl, sent, clock)

    def _deadline(self, sent: float, ttl: int) -> float:
        return sent + ttl * (1 - DRIFT) - MARGIN

    def left(self) -> float:
        """Seconds until this node must stop acting on the lease (negative: past)."""
        return self.valid_until - self.clock()

    def valid(self) -> bool:
        return self.left() > 0

    async def renew(self) -> bool:
        """Renew the lease once; False (and never valid again) if etcd no longer has it.
        A renewal that fails to reach etcd raises ``ClusterError`` and moves nothing."""
        sent = self.clock()
        ttl = await self.etcd.keepalive(self.id)
        if ttl <= 0:
            self.lost()
            return False
        self.valid_until = max(self.valid_until, self._deadline(sent, ttl))
        return True

    def lost(self) -> None:
        self.valid_until = float("-inf")

    async def release(self) -> None:
        """Give the lease back now (a planned hand-over): its keys go at once."""
        self.lost()
        await self.etcd.revoke(self.id)

    async def claim(self, key: str, value: bytes) -> KV | None:
        """Take ``key`` for this lease if nobody holds it; None when taken, else the
        holder's entry as it stands."""
        if await self.etcd.swap(key, value, lease=self.id):
            return None
        holder = await self.etcd.get(key)
        if holder is None:  # the holder's lease ran out between the two requests
            return await self.claim(key, value)
        return holder
