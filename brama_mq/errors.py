"""brama_mq's error hierarchy.

A leaf module (imports nothing from brama_mq) so every layer, the sans-I/O core
included, can raise these. Transport code maps kombu/amqp errors onto them and keeps
the original as ``__cause__``.
"""

from __future__ import annotations

from typing import Any


def breaker_name(scope: str | None, connection: str) -> str:
    """How messages, logs and the CLI write a breaker: ``scope/connection``, or the bare
    connection when it has no scope (one way everywhere; routing keys use dots)."""
    return connection if scope is None else f"{scope}/{connection}"


def plural(count: int, word: str) -> str:
    """``1 breaker``, ``2 breakers``."""
    return f"{count} {word}" + ("" if count == 1 else "s")


class BramaError(Exception):
    """Base class of every error brama_mq raises on purpose."""


class InvalidNameError(BramaError, ValueError):
    """A scope or connection name that cannot travel as one routing-key word."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"invalid {field} {value!r}: {problem}")


class PolicyError(BramaError, ValueError):
    """A breaker policy option with a bad value; names the option."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"invalid policy option {field}={value!r}: {problem}")


class FilterError(BramaError, ValueError):
    """A subscription filter that cannot become a binding (e.g. an unknown event name)."""


class ProtocolError(BramaError, ValueError):
    """A wire message that cannot be decoded; ``field`` and ``value`` say what was wrong."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(message)


class NotRegisteredError(BramaError, LookupError):
    """A command or query named a connection the owner does not know."""


class AlreadyRegisteredError(BramaError):
    """``register`` of a connection that already exists (reported, never raised by the owner)."""


class CommandRejectedError(BramaError):
    """The owner refused a command sent with ``wait=True``; ``status`` says why."""

    def __init__(self, status: str, message: str) -> None:
        self.status = status
        super().__init__(message)


class TransportError(BramaError):
    """Talking to the broker failed; the kombu/amqp error is kept as ``__cause__``."""


class BrokerUnavailableError(TransportError, ConnectionError):
    """The broker could not be reached (refused, reset, timed out)."""


class BrokerStartingError(BrokerUnavailableError):
    """The broker answers but is not fully up: a durable queue or stream whose home node
    is still starting. Worth waiting for even on a process's first connection."""


class ConfirmError(TransportError):
    """The broker did not confirm a critical publish (nack, or confirms timed out)."""


class OutboxFullError(TransportError):
    """The client's bounded outbox is full while the broker is away; nothing was queued."""


class RequestTimeoutError(BramaError, TimeoutError):
    """An RPC to the owner got no answer in time (no owner running, or it is overloaded)."""


class CircuitOpenError(BramaError):
    """A guarded call refused because the circuit is open (or half-open with no permit)."""

    def __init__(
        self,
        connection: str,
        scope: str | None,
        state: str,
        retry_after_ms: int | None,
    ) -> None:
        self.connection = connection
        self.scope = scope
        self.state = state
        self.retry_after_ms = retry_after_ms
        # args are the constructor's arguments: Celery's JSON result serializer rebuilds
        # an exception as ``cls(*args)``, so a client's result.get() raises this class.
        super().__init__(connection, scope, state, retry_after_ms)

    def __str__(self) -> str:
        where = breaker_name(self.scope, self.connection)
        left = ("until closed by hand" if self.retry_after_ms is None
                else f"{self.retry_after_ms} ms left")
        return f"circuit {where} is {self.state} ({left})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its fields (Celery ships task errors between processes).
        return (type(self), (self.connection, self.scope, self.state, self.retry_after_ms))

    @property
    def retry_after(self) -> float | None:
        """Seconds until a call may be tried again (None: open until closed by hand)."""
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000.0


class NoTopologyError(BramaError, LookupError):
    """A read-only client found no brama_mq topology under its prefix (a typo, or no
    worker has ever run with it); it declares nothing, so a typo leaves no queues."""

    def __init__(self, prefix: str, broker: str, missing: str) -> None:
        self.prefix = prefix
        self.broker = broker
        self.missing = missing
        super().__init__(
            f"no brama_mq topology for prefix {prefix!r} on {broker} ({missing}): no "
            "worker has run with this prefix; check --prefix / BRAMA_PREFIX"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.prefix, self.broker, self.missing))


class ShardMismatchError(BramaError):
    """The broker's stored shard count differs from this process's; it must not start.

    Routing a connection to ``stable_shard(..., configured)`` while the owners use
    ``stored`` would put its commands on the wrong owner, so both counts are named.
    """

    def __init__(self, prefix: str, configured: int, stored: int | None) -> None:
        self.prefix = prefix
        self.configured = configured
        self.stored = stored
        held = "a different count" if stored is None else f"{stored} shard(s)"
        super().__init__(
            f"shard count mismatch on prefix {prefix!r}: this process is configured for "
            f"{configured} shard(s) but the broker's record says {held}; set BRAMA_SHARDS "
            f"(or --shards) to {stored if stored is not None else 'the stored count'}, or "
            "delete the record queue only after every owner of the old count has stopped"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.prefix, self.configured, self.stored))


class AccessRefusedError(TransportError):
    """The broker refused an operation this user's permissions do not grant."""
