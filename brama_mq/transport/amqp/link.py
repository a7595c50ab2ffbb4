"""The life of one AMQP connection, shared by every link role: connect through the
failover list, set up, recover with backoff, close; the roles implement ``_setup`` and
``_on_lost``."""


import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from brama_mq.errors import (
    BramaError,
    BrokerUnavailableError,
    TransportError,
)
from brama_mq.transport.amqp.endpoint import AmqpEndpoint
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
    describe,
    is_fatal,
    map_error,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


def backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to ``cap``, times 0.5-1.0."""
    return min(cap, 0.1 * float(2 ** min(attempt, 16))) * random.uniform(0.5, 1.0)


def recoverable(exc: BaseException) -> bool:
    """Whether a reconnect may cure ``exc`` (our own errors are never retried here)."""
    return isinstance(exc, RECOVERABLE_ERRORS) and not isinstance(exc, BramaError)


class Connector:
    """One kombu connection, opened once per attempt over every failover host."""

    def __init__(self, transport: AmqpEndpoint) -> None:
        self._t = transport
        self._kconn: Any = transport.new_kombu_connection()
        self._amqp: Any = None

    def connect(self) -> Any:
        """The py-amqp connection, trying each configured host once (no sleeping)."""
        attempts = max(1, len(getattr(self._kconn, "alt", None) or ()))
        last: BaseException | None = None
        for _ in range(attempts):
            try:
                self._kconn.collect()
                self._kconn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
                # Connected now, so this is the py-amqp connection (no retry inside).
                self._amqp = self._kconn.connection
                return self._amqp
            except RECOVERABLE_ERRORS as exc:
                last = exc
                if is_fatal(exc):
                    raise
                self._kconn.maybe_switch_next()
        assert last is not None
        raise last

    def drop(self) -> None:
        """Forget a dead connection without talking to the broker."""
        try:
            self._kconn.collect()
        except Exception:  # a dead connection may fail in any way while collected
            log.debug("ignoring error while collecting a dead connection", exc_info=True)

    def switch_next(self) -> None:
        """Start the next connect at the next host of the failover list (after a drop:
        the host just left may be frozen, and a connect to it would wait a timeout)."""
        try:
            self._kconn.maybe_switch_next()
        except Exception:  # switching closes what is left of the old connection
            log.debug("ignoring error while switching hosts", exc_info=True)

    @property
    def host(self) -> str:
        """The host (``host:port``) this connector connects to now, for log lines."""
        kconn = self._kconn
        return f"{kconn.hostname}:{kconn.port}"

    def close(self, timeout: float = 5.0) -> None:
        """Close politely (the broker requeues unacked deliveries), waiting at most
        ``timeout`` s for the broker's close-ok."""
        conn, self._amqp = self._amqp, None
        try:
            if conn is not None and conn.connected:
                conn.sock.settimeout(timeout)
            self._kconn.release()
        except Exception:
            log.debug("ignoring error while closing a connection", exc_info=True)
            self.drop()


class AmqpLink:
    """Connection lifecycle shared by every link: connect, set up, recover, close.

    Subclasses implement :meth:`_setup` (open channels, declare, consume, republish)
    and may implement :meth:`_on_lost` (forget state tied to the dead channel).
    """

    role = "link"

    def __init__(self, transport: AmqpEndpoint) -> None:
        self._t = transport
        self._connector = Connector(transport)
        self._conn: Any = None
        self._epoch = 0
        self._closed = False
        self._lost: BaseException | None = None
        self._counters: dict[str, int] = {"reconnects": 0}
        self._max_wait = transport.heartbeat / 4 if transport.heartbeat else 1.0
        self._interrupted = False
        self._open(deadline=None)

    # -- lifecycle -------------------------------------------------------------
    def _setup(self, conn: Any) -> None:
        raise NotImplementedError

    def _on_lost(self) -> None:
        """Forget what belonged to the dead connection (buffers, channels)."""

    def _error(self, exc: BaseException, what: str) -> TransportError:
        return map_error(exc, f"{self.role}: {what}", self._t.url)

    def _open(self, *, deadline: float | None) -> None:
        """Connect and set up, retrying with backoff until ``deadline`` (None: one round)."""
        attempt = 0
        while True:
            try:
                conn = self._connector.connect()
                self._conn = conn
                self._epoch += 1
                self._setup(conn)
                self._lost = None
                if attempt or self._epoch > 1:
                    log.info("%s connected to %s (epoch %d)", self.role,
                             self._connector.host, self._epoch)
                return
            except BramaError:
                self._connector.drop()
                self._conn = None
                raise
            except RECOVERABLE_ERRORS as exc:
                self._connector.drop()
                self._conn = None
                self._on_lost()
                if is_fatal(exc):
                    raise self._error(exc, "connect and declare") from exc
                now = time.monotonic()
                if deadline is None or now >= deadline or self._interrupted:
                    raise self._error(exc, "connect") from exc
                pause = min(backoff(attempt, self._t.max_backoff), max(0.0, deadline - now))
                log.warning("%s cannot reach %s (%s); retrying in %.2f s", self.role,
                            self._t.masked_url, describe(exc, self._t.url), pause)
                end = now + pause
                while not self._interrupted and (left := end - time.monotonic()) > 0:
                    time.sleep(min(left, 0.1))  # short naps, so interrupt() is noticed
                if self._interrupted:
                    raise self._error(exc, "connect") from exc
                attempt += 1

    def abandon(self, reason: str) -> None:
        """Drop the connection at once, without a close handshake (its node may be frozen
        or cut off), so the broker hands on what this link consumed (an owner queue, its
        unacked deliveries); the next call reconnects, starting at the next host of the
        failover list. For the single-threaded links (owner, stream reader)."""
        if self._closed or self._conn is None:
            return
        log.warning("%s leaves %s: %s", self.role, self._connector.host, reason)
        self._connector.drop()
        self._conn = None
        self._lost = BrokerUnavailableError(reason)
        self._on_lost()

    def interrupt(self) -> None:
        """Stop waiting for the broker: a reconnect in progress, or a later one, raises
        BrokerUnavailableError instead of retrying. Safe to call from a signal handler."""
        self._interrupted = True

    def _recover(self, exc: BaseException) -> None:
        """Replace a dead connection: reconnect with backoff, set up again, republish."""
        if self._closed:
            raise self._error(exc, "use after close") from exc
        log.warning("%s lost its connection to %s (%s); reconnecting", self.role,
                    self._connector.host, describe(exc, self._t.url))
        self._counters["reconnects"] += 1
        self._connector.drop()
        self._connector.switch_next()  # the host just lost may be down or frozen
        self._conn = None
        self._lost = exc
        self._on_lost()
        self._open(deadline=time.monotonic() + self._t.reconnect_timeout)

    def _ensure(self) -> None:
        """Raise if closed; reconnect first if an earlier call lost the connection."""
        if self._closed:
            raise TransportError(f"{self.role} is closed")
        if self._conn is None or self._lost is not None:
            self._recover(self._lost or BrokerUnavailableError("not connected"))

    def _tick(self) -> None:
        """Send heartbeats when due; raises ConnectionForced if the broker went silent."""
        self._conn.heartbeat_tick()

    def _with_recovery(
        self, deadline: float, attempt: Callable[[], None],
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Run ``attempt`` (wait for deliveries, drain them) until it returns; after a
        broker fault reconnect and try again while ``deadline`` (and ``stop()``) allow.
        The one receive loop of every consuming role: our own errors other than an
        outage are raised as they are."""
        while True:
            self._ensure()
            try:
                attempt()
                return
            except BramaError as exc:
                if not isinstance(exc, BrokerUnavailableError) or self._closed:
                    raise
                self._recover(exc)
            except RECOVERABLE_ERRORS as exc:
                self._recover(exc)
            if time.monotonic() >= deadline or (stop is not None and stop()):
                return

    def _drain_until(self, deadline: float, done: Callable[[], bool]) -> None:
        """Process incoming frames until ``done()`` or the deadline (socket.timeout-free)."""
        conn = self._conn
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=min(remaining, self._max_wait))
            self._tick()

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting, until ``enough()``."""
        conn = self._conn
        while not enough():
            try:
                conn.drain_events(timeout=0)
            except TimeoutError:
                return

    def close(self) -> None:
        """Close the connection; the broker requeues unacknowledged deliveries."""
        if self._closed:
            return
        self._closed = True
        self._connector.close()
        self._conn = None
        self._t.forget(self)


class ConsumerMixin:
    """Buffered consumption: the callback only appends; fetch drains and converts."""

    _buffer: deque[Any]
    _cancelled: bool

    def _on_delivery(self, msg: Any) -> None:
        self._buffer.append(msg)

    def _on_cancel(self, consumer_tag: str) -> None:
        # The queue was deleted under us: reconnect and declare it again.
        self._cancelled = True
