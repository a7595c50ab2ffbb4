"""The wall clock of the wire: command ``ts`` and event times are milliseconds since the
epoch.

It lives here, below the owner and the client, because both stamp what they send with
it; the client then needs nothing from ``brama_mq.owner``.
"""

from __future__ import annotations

import time

__all__ = ["wall_clock_ms"]


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (the protocol's ``ts``)."""
    return time.time_ns() // 1_000_000
