"""The client's way to the owner: one link, shard routing, posted commands and RPCs.

Everything in :mod:`brama_mq.client` that talks to the owner goes through a
:class:`CommandLink`: :class:`~brama_mq.client.Brama` (its commands and queries), the
outbox of guard reports and, through the client, the local view's snapshots. It sits
below all of them and imports none of them, so the client package has no import circle:
``link`` < ``local_view``, ``outbox`` < ``guard`` < ``brama`` < ``default``.

The link is opened on first use (thread-safe) and is this process's own: after a
``fork()`` the child's next command opens a new one (see :func:`_after_fork`).

It also names the sender of outcome reports: :attr:`CommandLink.reporter`, the
``reporter`` every ``success``/``failure`` carries (a policy's ``min_reporters`` counts
distinct ones). By default it is :func:`process_reporter`, ``<host>:<pid>``, recomputed
in a forked child, so each process of a pre-forking server reports as itself.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from brama_mq.core.policy import MAX_REPORTER_CHARS, check_reporter
from brama_mq.core.routing import stable_shard
from brama_mq.errors import CommandRejectedError, NotRegisteredError
from brama_mq.protocol import Event, Reply, command_body, decode_reply
from brama_mq.protocol.clock import wall_clock_ms
from brama_mq.transport.base import ClientLink, Transport

__all__ = ["Applied", "BufferedLink", "CommandLink", "process_reporter"]

#: This process's default reporter, made on first use (the fork hook forgets it).
_PROCESS_REPORTER: str | None = None


def process_reporter() -> str:
    """The default ``reporter`` of this process's outcome reports: ``<host>:<pid>``
    (the host name cut so the whole fits the protocol's 200 characters). Computed once
    per process: a forked child computes its own (see :func:`_after_fork`)."""
    global _PROCESS_REPORTER
    name = _PROCESS_REPORTER
    if name is None:
        pid = str(os.getpid())
        host = socket.gethostname() or "localhost"
        name = _PROCESS_REPORTER = f"{host[: MAX_REPORTER_CHARS - len(pid) - 1]}:{pid}"
    return name


@dataclass(slots=True)
class Applied:
    """What the owner did with a command sent with ``wait=True``."""

    status: str
    events: list[Event] = field(default_factory=list)

    @property
    def event_names(self) -> list[str]:
        return [e.event for e in self.events]


@runtime_checkable
class BufferedLink(ClientLink, Protocol):
    """A :class:`ClientLink` that keeps commands while the broker is away (both shipped
    links are). Checked once when the link opens, so every later call is a plain,
    typed method call; a link without these is sent to command by command, confirmed."""

    max_buffer: int

    def post_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """:meth:`ClientLink.post` for ``(body, routing_key)`` pairs, written together."""
        ...

    def pending(self) -> int:
        """Commands handed over and not yet confirmed by the broker."""
        ...

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every command posted so far is confirmed; False on timeout."""
        ...


class CommandLink:
    """One client's link to the owner, opened lazily: routing, posting and RPCs.

    ``request_timeout``: seconds an RPC waits by default. ``max_buffer``: commands a
    buffering link may keep while the broker is away (None: the link's default).
    ``reporter``: the name outcome reports carry (None: :func:`process_reporter`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        request_timeout: float = 5.0,
        max_buffer: int | None = None,
        reporter: str | None = None,
    ) -> None:
        self.transport = transport
        self.request_timeout = request_timeout
        self.max_buffer = max_buffer
        self._reporter = None if reporter is None else check_reporter(reporter)
        self._link: ClientLink | None = None
        self._buffered: BufferedLink | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the reporter
    @property
    def reporter(self) -> str:
        """The ``reporter`` of this client's outcome reports: the one it was given, else
        this process's :func:`process_reporter` (so a forked child reports as itself)."""
        name = self._reporter
        return process_reporter() if name is None else name

    @reporter.setter
    def reporter(self, name: str | None) -> None:
        """A fixed name (checked: 1..200 characters), or None for the process default."""
        self._reporter = None if name is None else check_reporter(name)

    # ------------------------------------------------------------------ the link
    @property
    def link(self) -> ClientLink:
        """The link, opened on first use (connecting: it may raise what the broker says)."""
        link = self._link
        if link is None:
            link = self._open()
        return link

    @property
    def opened(self) -> ClientLink | None:
        """The link if this process opened it already (never opens one)."""
        return self._link

    def _open(self) -> ClientLink:
        with self._lock:
            link = self._link
            if link is None:
                link = self.transport.client_link()
                buffered = link if isinstance(link, BufferedLink) else None
                if buffered is not None and self.max_buffer is not None:
                    buffered.max_buffer = self.max_buffer
                self._buffered = buffered
                self._link = link
                _LINKS.add(self)
            return link

    def close(self) -> None:
        """Close the link (the next command opens a new one)."""
        with self._lock:
            link, self._link, self._buffered = self._link, None, None
        if link is not None:
            link.close()

    # ------------------------------------------------------------------ routing
    def route(self, scope: str | None, connection: str | None) -> str:
        """The routing key of the owner (shard) of a connection; ``owner`` unsharded."""
        shards = self.transport.topology.shards
        if shards <= 1 or connection is None:
            return "owner"
        return f"owner.{stable_shard(scope, connection, shards)}"

    def shard_keys(self) -> list[str]:
        """The routing key of every owner shard."""
        return [key for _, key in self.transport.topology.owner_queues()]

    # ------------------------------------------------------------------ posting
    def post(self, body: bytes, key: str, ident: str) -> None:
        """Send a command: returns once the broker confirmed it, or, while the broker is
        away, once it is buffered (OutboxFullError when the buffer is full)."""
        link = self._link
        if link is None:
            link = self._open()
        link.post(body, key, message_id=ident, confirm=True)

    def post_many(self, bodies: Sequence[tuple[bytes, str]]) -> None:
        """Hand over ``(body, routing_key)`` commands without waiting: a buffering link
        keeps each until the broker confirmed it (republished after a reconnect); any
        other link sends them one by one, each confirmed."""
        link = self.link
        buffered = self._buffered
        if buffered is not None:
            buffered.post_many(bodies)
            return
        for body, key in bodies:
            link.send(body, key)

    def pending(self) -> int:
        """Commands posted and not yet confirmed by the broker (0 before the link opens)."""
        buffered = self._buffered
        return 0 if buffered is None else buffered.pending()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every posted command is confirmed; False if some are still waiting."""
        buffered = self._buffered
        return True if buffered is None else buffered.flush(timeout)

    # ------------------------------------------------------------------ requests
    def ask(self, body: bytes, key: str, timeout: float | None = None) -> Reply:
        """One RPC to the owner behind ``key`` (RequestTimeoutError when no answer comes)."""
        wait = self.request_timeout if timeout is None else timeout
        return decode_reply(self.link.request(body, wait, key))

    def command(
        self,
        op: str,
        connection: str | None,
        scope: str | None,
        reason: str | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        wait: bool = False,
    ) -> Applied | None:
        """Encode (``command_body``: no pydantic model on the way out) and send a command.
        Without ``wait`` it returns once the broker confirmed it, or at once while the
        broker is away (buffered); with ``wait`` it is an RPC and says what was applied."""
        body, ident = command_body(
            op, connection, scope, reason, options, now_ms=wall_clock_ms()
        )
        key = self.route(scope, connection)
        if wait:
            return self._applied(self.ask(body, key))
        self.post(body, key, ident)
        return None

    @staticmethod
    def _applied(reply: Reply) -> Applied:
        result = reply.result if isinstance(reply.result, Mapping) else {}
        status = str(result.get("status", "applied" if reply.ok else "invalid"))
        if not reply.ok and status != "already_registered":
            raise _refusal(status, reply.error, status)
        return Applied(status, [Event.model_validate(e) for e in reply.events])

    def query(
        self,
        op: str,
        connection: str | None,
        scope: str | None,
        *,
        timeout: float | None = None,
        key: str | None = None,
        **options: Any,
    ) -> Any:
        """One RPC to the owner (of ``key``, default the connection's shard); its result."""
        body, _ = command_body(op, connection, scope, options=options, now_ms=wall_clock_ms())
        reply = self.ask(body, self.route(scope, connection) if key is None else key, timeout)
        if not reply.ok:
            status = reply.result.get("status") if isinstance(reply.result, Mapping) else None
            raise _refusal(str(status or "invalid"), reply.error, "query refused")
        return reply.result

    def snapshot(
        self, scope: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Status of every connection (or one scope's), gathered across shards."""
        out: list[dict[str, Any]] = []
        for key in self.shard_keys():
            out.extend(self.query("snapshot", None, scope, timeout=timeout, key=key)["connections"])
        return out


def _refusal(status: str, error: str | None, fallback: str) -> Exception:
    """The error for an owner's refusal: NotRegisteredError for an unknown connection;
    ``fallback`` is the message when the owner gave none."""
    if status == "not_registered":
        return NotRegisteredError(error or "not registered")
    return CommandRejectedError(status, error or fallback)


_LINKS: weakref.WeakSet[CommandLink] = weakref.WeakSet()
#: Links of a parent process, inherited by fork: kept referenced, never used or closed.
_INHERITED: list[ClientLink] = []


def _after_fork() -> None:
    # The parent's link (socket, I/O thread) is not this process's: the next command
    # opens a new one. Closing it here would talk on the parent's connection; its lock
    # may have been held by a parent thread that does not exist here. The child is a
    # reporter of its own: its default name has its pid.
    global _PROCESS_REPORTER
    _PROCESS_REPORTER = None
    for commands in list(_LINKS):
        if commands._link is not None:
            _INHERITED.append(commands._link)
        commands._link = None
        commands._buffered = None
        commands._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
