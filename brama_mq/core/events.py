"""States, event types and the event record the engine emits.

Plain strings are used for states and event names on purpose: they are what travels on
the wire, and comparing interned strings keeps the engine's hot path cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
STATES: Final = frozenset({CLOSED, OPEN, HALF_OPEN})

STATE_CHANGE: Final = "state_change"
REGISTRATION: Final = "registration"
FAILURE: Final = "failure"
SUCCESS: Final = "success"
EXPIRY: Final = "expiry"
CLEANUP: Final = "cleanup"
CIRCUIT_OPENED: Final = "circuit_opened"
CIRCUIT_CLOSED: Final = "circuit_closed"
CIRCUIT_RESET: Final = "circuit_reset"
CONNECTION_REGISTERED: Final = "connection_registered"
CONNECTION_UNREGISTERED: Final = "connection_unregistered"
CIRCUIT_HALF_OPENED: Final = "circuit_half_opened"
CONNECTION_REMOVED: Final = "connection_removed"

#: Every event type of Brama's status-notification spec, in the spec's order.
EVENT_TYPES: Final[tuple[str, ...]] = (
    STATE_CHANGE,
    REGISTRATION,
    FAILURE,
    SUCCESS,
    EXPIRY,
    CLEANUP,
    CIRCUIT_OPENED,
    CIRCUIT_CLOSED,
    CIRCUIT_RESET,
    CONNECTION_REGISTERED,
    CONNECTION_UNREGISTERED,
    CIRCUIT_HALF_OPENED,
    CONNECTION_REMOVED,
)

# ``data.reason`` words programs match on: openings by a rate (``data.detail`` has the
# sentence) and changes of mode. Other reasons stay Brama's sentences ("Threshold exceeded").
REASON_FAILURE_RATE: Final = "failure_rate"
REASON_SLOW_CALL_RATE: Final = "slow_call_rate"
REASON_MODE: Final = "mode"

#: Events published persistent and confirmed before the causing command is acked.
CRITICAL_EVENTS: Final = frozenset(
    {STATE_CHANGE, CIRCUIT_OPENED, CIRCUIT_CLOSED, CIRCUIT_HALF_OPENED, CIRCUIT_RESET}
)


@dataclass(slots=True)
class Event:
    """One thing that happened to one connection, as section 5 of the contract shapes it."""

    event: str
    timestamp: int
    connection: str
    scope: str | None
    id: str
    seq: int
    data: dict[str, Any] = field(default_factory=dict)
    #: The owner's epoch: its takeover record's journal offset + 1 (0 before any takeover,
    #: or without a journal). Orders events of one connection with ``seq``, see
    #: :mod:`brama_mq.core.ordering`.
    epoch: int = 0

    @property
    def critical(self) -> bool:
        return self.event in CRITICAL_EVENTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "timestamp": self.timestamp,
            "connection": self.connection,
            "scope": self.scope,
            "id": self.id,
            "seq": self.seq,
            "epoch": self.epoch,
            "data": self.data,
        }
