"""The fence: whether this node may still change its volume and acknowledge it.

A primary under high availability holds its role as a lease (``ha.lease``) and
may acknowledge a change only while the lease surely holds. The fence is that
rule where the changes are made: open until a deadline on the boot clock, which
each renewal of the lease moves on, shut at once when the role is given up.
Every journaled operation asks it before it changes anything (``Mutator.run``),
and an fsync asks it again after its commit before it returns, so a node that
was paused past its deadline (SIGSTOP, a frozen VM) refuses the first request it
gets on waking, before it acknowledges anything. Reads never ask.

A volume served without one (no high availability) is never fenced.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Fenced
from ..system import boot_clock


class Fence:
    """Open until ``until`` (boot clock seconds); ``check`` raises ``Fenced`` after."""

    def __init__(self, until: float = float("-inf"),
                 clock: Callable[[], float] = boot_clock) -> None:
        self.until = until
        self.clock = clock
        self.reason = "this node does not hold the primary role"

    def open_until(self, until: float) -> None:
        """Let changes through until ``until`` (a renewed lease's deadline)."""
        self.until = until

    def shut(self, reason: str) -> None:
        """Refuse every change from now on, saying ``reason``."""
        self.until = float("-inf")
        self.reason = reason

    def is_open(self) -> bool:
        return self.clock() < self.until

    def check(self) -> None:
        if not self.is_open():
            raise Fenced(f"writes refused: {self.reason}")
