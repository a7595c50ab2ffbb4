"""What goes into the engine and what comes out: commands, results, probes, advances.

Apart from the engine (core/engine.py re-exports every name) so the state machine's
module holds the state machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from brama_mq.core.events import Event

# Result statuses.
APPLIED: Final = "applied"
ALREADY_REGISTERED: Final = "already_registered"
NOT_REGISTERED: Final = "not_registered"
INVALID: Final = "invalid"


class CommandLike(Protocol):
    """What ``Engine.apply`` reads from a command (protocol.Command fits)."""

    @property
    def op(self) -> str: ...
    @property
    def connection(self) -> str | None: ...
    @property
    def scope(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


@dataclass(slots=True)
class Command:
    """A plain command for driving the engine without the wire models."""

    op: str
    connection: str | None = None
    scope: str | None = None
    reason: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Result:
    """What applying one command did: its events, or why it was refused."""

    status: str
    events: list[Event]
    error: str | None = None
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.status == APPLIED


@dataclass(slots=True)
class Advance:
    """Events that fell due, and when ``advance`` should be called next (None: never)."""

    events: list[Event]
    next_deadline: int | None


@dataclass(slots=True)
class Probe:
    """Answer to ``acquire_probe``: may the caller try the service now?"""

    granted: bool
    state: str
    lease: str | None = None
    lease_expires_at: int | None = None
    retry_after_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "granted": self.granted,
            "state": self.state,
            "lease": self.lease,
            "lease_expires_at": self.lease_expires_at,
            "retry_after_ms": self.retry_after_ms,
        }
