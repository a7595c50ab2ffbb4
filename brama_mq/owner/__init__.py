"""The state-owner service: the one process that runs the breakers."""

from brama_mq.owner.service import Owner, OwnerStats, run_owner, wall_clock_ms

__all__ = ["Owner", "OwnerStats", "run_owner", "wall_clock_ms"]
