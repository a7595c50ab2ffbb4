"""Wire models of section 5: commands, events and RPC replies.

All models are strict (no ``"1"`` -> ``1`` coercion: other languages must send the types
the contract names) and frozen, and keep unknown fields (``extra="allow"``) so a newer
peer's optional additions survive a round trip through an older one.
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from brama_mq.core import events as core_events
from brama_mq.core.events import EVENT_TYPES
from brama_mq.core.routing import check_names, encode_name, encode_scope
from brama_mq.errors import InvalidNameError

__all__ = [
    "COMMAND_OPS",
    "CONNECTION_OPTIONAL_OPS",
    "PROTOCOL_VERSION",
    "QUERY_OPS",
    "Command",
    "Event",
    "Op",
    "Reply",
]

PROTOCOL_VERSION: Final = 1

Op = Literal[
    "register",
    "unregister",
    "success",
    "failure",
    "open",
    "close",
    "reset",
    "configure",
    "status",
    "snapshot",
    "acquire_probe",
    "release_probe",
]

#: Ops that change breakers (section 5).
COMMAND_OPS: Final = frozenset(
    {"register", "unregister", "success", "failure", "open", "close", "reset", "configure"}
)
#: Ops of the owner's RPC that only read, or ration half-open probes.
QUERY_OPS: Final = frozenset({"status", "snapshot", "acquire_probe", "release_probe"})
#: Ops whose ``connection`` may be None: configure (the defaults for future
#: registrations) and snapshot (every connection).
CONNECTION_OPTIONAL_OPS: Final = frozenset({"configure", "snapshot"})

assert frozenset(get_args(Op)) == COMMAND_OPS | QUERY_OPS

_EVENT_SET: Final = frozenset(EVENT_TYPES)


def _check_version(v: int) -> int:
    if v != PROTOCOL_VERSION:
        raise ValueError(f"unsupported version {v!r} (this side speaks {PROTOCOL_VERSION})")
    return v


def _check_scope(scope: str | None) -> str | None:
    try:
        encode_scope(scope)
    except InvalidNameError as exc:
        raise ValueError(str(exc)) from None
    return scope


def _check_connection(connection: str, info: ValidationInfo) -> str:
    # scope is declared before connection, so it has been validated already (or failed,
    # in which case its error is reported and only the connection itself is checked).
    try:
        if "scope" in info.data:
            check_names(info.data["scope"], connection)
        else:
            encode_name(connection)
    except InvalidNameError as exc:
        raise ValueError(str(exc)) from None
    return connection


class Command(BaseModel):
    """Client -> owner. ``connection`` may be None only for configure and snapshot."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    v: int = PROTOCOL_VERSION
    op: Op
    scope: str | None = None
    connection: str | None = Field(default=None, validate_default=True)
    id: str = Field(min_length=1)
    ts: int = Field(ge=0)
    reason: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    _v = field_validator("v")(_check_version)
    _scope = field_validator("scope")(_check_scope)

    @field_validator("connection")
    @classmethod
    def _connection(cls, connection: str | None, info: ValidationInfo) -> str | None:
        if connection is None:
            op = info.data.get("op")
            if op is not None and op not in CONNECTION_OPTIONAL_OPS:
                raise ValueError(f"a connection is required for op {op!r}")
            return None
        return _check_connection(connection, info)


class Event(BaseModel):
    """Owner -> subscribers; ``data`` carries at least ``state`` and ``failure_count``."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    event: str
    timestamp: int = Field(ge=0)
    scope: str | None = None
    connection: str
    id: str = Field(min_length=1)
    #: Below 2**40, so ``(epoch, seq)`` packs into one int (:mod:`brama_mq.core.ordering`).
    seq: int = Field(ge=1, lt=1 << 40)
    #: The publishing owner's epoch (0 from owners that predate epochs, or without a journal).
    epoch: int = Field(0, ge=0)
    data: dict[str, Any] = Field(default_factory=dict)

    _scope = field_validator("scope")(_check_scope)

    @field_validator("event")
    @classmethod
    def _event(cls, event: str) -> str:
        if event not in _EVENT_SET:
            raise ValueError(f"unknown event {event!r}; valid: {', '.join(EVENT_TYPES)}")
        return event

    @field_validator("connection")
    @classmethod
    def _connection(cls, connection: str, info: ValidationInfo) -> str:
        return _check_connection(connection, info)

    @classmethod
    def from_core(cls, event: core_events.Event) -> Event:
        """The wire model of an engine event (validated)."""
        return cls.model_validate(event.to_dict())

    def to_core(self) -> core_events.Event:
        """The engine's record of this event; unknown extra fields are dropped."""
        return core_events.Event(
            event=self.event,
            timestamp=self.timestamp,
            connection=self.connection,
            scope=self.scope,
            id=self.id,
            seq=self.seq,
            data=dict(self.data),
            epoch=self.epoch,
        )

    @property
    def critical(self) -> bool:
        return self.event in core_events.CRITICAL_EVENTS

    def _data_str(self, name: str) -> str | None:
        value = self.data.get(name)
        return value if isinstance(value, str) else None

    @property
    def state(self) -> str | None:
        """The connection's state after this event (``data.state``), if given."""
        return self._data_str("state")

    @property
    def new_state(self) -> str | None:
        return self._data_str("new_state")

    @property
    def previous_state(self) -> str | None:
        return self._data_str("previous_state")

    @property
    def reason(self) -> str | None:
        return self._data_str("reason")

    @property
    def failure_count(self) -> int | None:
        value = self.data.get("failure_count")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def mode(self) -> str:
        """The connection's operating mode: ``data.mode``, which owners send whenever it
        is not ``normal`` (and on every change of mode)."""
        return self._data_str("mode") or "normal"

    @property
    def detail(self) -> str | None:
        """The sentence behind a machine-word ``reason`` (e.g. ``failure_rate``)."""
        return self._data_str("detail")

    @property
    def slow(self) -> bool:
        """Whether a success/failure was slower than the policy's ``slow_call_ms``."""
        return self.data.get("slow") is True

    @property
    def reporters(self) -> list[str]:
        """Reporters whose failures opened the circuit (``data.reporters``; newest last)."""
        value = self.data.get("reporters")
        if not isinstance(value, list):
            return []
        return [name for name in value if isinstance(name, str)]

    def _data_rate(self, name: str) -> float | None:
        value = self.data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    @property
    def failure_rate(self) -> float | None:
        """Percent failed over the window (``data.failure_rate``), if the event says."""
        return self._data_rate("failure_rate")

    @property
    def slow_call_rate(self) -> float | None:
        """Percent slow over the window (``data.slow_call_rate``), if the event says."""
        return self._data_rate("slow_call_rate")


class Reply(BaseModel):
    """An answer of the owner's RPC; ``events`` are wire-shaped event dicts."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    v: int = PROTOCOL_VERSION
    ok: bool
    result: Any = None
    error: str | None = None
    events: list[dict[str, Any]] = Field(default_factory=list)

    _v = field_validator("v")(_check_version)
