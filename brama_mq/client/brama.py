"""The ``Brama`` client: report outcomes, steer circuits, ask the owner.

Everything a command needs is checked here, before anything is sent, so a typo fails
in the caller's stack with the bad value named, not later in a dead-letter queue.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from brama_mq.core.events import OPEN
from brama_mq.core.policy import DEFAULT_POLICY, check_metadata
from brama_mq.core.routing import check_names, stable_shard
from brama_mq.errors import (
    AlreadyRegisteredError,
    CommandRejectedError,
    NotRegisteredError,
    PolicyError,
)
from brama_mq.owner.service import wall_clock_ms
from brama_mq.protocol import Event, Reply, command_body, decode_reply
from brama_mq.settings import Settings
from brama_mq.transport import Topology, Transport, open_transport
from brama_mq.transport.base import ClientLink

if TYPE_CHECKING:
    from brama_mq.client.guard import Guard, GuardedCall, GuardRuntime

_UNSET: Any = object()
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class Applied:
    """What the owner did with a command sent with ``wait=True``."""

    status: str
    events: list[Event] = field(default_factory=list)

    @property
    def event_names(self) -> list[str]:
        return [e.event for e in self.events]


class Brama:
    """A handle on a brama_mq deployment. Thread-safe; one per process is plenty."""

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        transport: Transport | None = None,
        prefix: str | None = None,
        shards: int | None = None,
        settings: Settings | None = None,
        request_timeout: float = 5.0,
        buffer_size: int | None = None,
    ) -> None:
        """``buffer_size``: commands sent without ``wait`` that may wait for the broker's
        confirm (while it is away, until it is back); one more raises OutboxFullError.
        Default ``BRAMA_CLIENT_BUFFER`` (10,000)."""
        if settings is None:
            settings = Settings.from_env(
                broker_url=broker_url, prefix=prefix, shards=shards, client_buffer=buffer_size
            )
        elif buffer_size is not None:
            settings = replace(settings, client_buffer=buffer_size)
        self.settings = settings
        self._owns_transport = transport is None
        if transport is None:
            transport = open_transport(
                settings.broker_url,
                Topology(settings.prefix, settings.shards),
                **settings.transport_options(),
            )
        self.transport = transport
        self.request_timeout = request_timeout
        self._link: ClientLink | None = None
        self._lock = threading.Lock()
        self.local_view: Any = None  # set by brama_mq.celery / LocalView.attach
        self._guard_runtime: GuardRuntime | None = None  # see brama_mq.client.guard
        self._guards: dict[tuple[Any, ...], Guard] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def link(self) -> ClientLink:
        link = self._link
        if link is None:
            with self._lock:
                if self._link is None:
                    new = self.transport.client_link()
                    if hasattr(new, "max_buffer"):
                        new.max_buffer = self.settings.client_buffer
                    self._link = new
                    _CLIENTS.add(self)
                link = self._link
        return link

    def connect(self) -> Brama:
        """Connect now instead of at the first call, to fail at start-up: an unreachable
        broker, refused credentials or permissions, a TLS certificate not accepted, or a
        shard count other than the broker's record (:class:`ShardMismatchError`, naming
        both counts) raise here. Local views and Celery guards connect at start anyway."""
        _ = self.link
        return self

    def _route(self, scope: str | None, connection: str | None) -> str:
        shards = self.transport.topology.shards
        if shards <= 1 or connection is None:
            return "owner"
        return f"owner.{stable_shard(scope, connection, shards)}"

    def _post(self, body: bytes, key: str, ident: str) -> None:
        """Send a command: returns once the broker confirmed it, or, while the broker is
        away, once it is buffered (OutboxFullError when the buffer is full)."""
        link: Any = self.link
        post = getattr(link, "post", None)
        if post is None:  # a ClientLink without a buffer: confirmed send
            link.send(body, key, message_id=ident)
        else:
            post(body, key, message_id=ident, confirm=True)

    def _applied(self, body: bytes, key: str) -> Applied:
        reply = decode_reply(self.link.request(body, self.request_timeout, key))
        result = reply.result if isinstance(reply.result, Mapping) else {}
        status = str(result.get("status", "applied" if reply.ok else "invalid"))
        if not reply.ok and status != "already_registered":
            if status == "not_registered":
                raise NotRegisteredError(reply.error or "not registered")
            raise CommandRejectedError(status, reply.error or status)
        return Applied(status, [Event.model_validate(e) for e in reply.events])

    def _query(
        self,
        op: str,
        connection: str | None,
        scope: str | None,
        *,
        timeout: float | None = None,
        key: str | None = None,
        **options: Any,
    ) -> Any:
        """One RPC to the owner (of ``key``, default the connection's shard)."""
        body, _ = command_body(op, connection, scope, options=options, now_ms=wall_clock_ms())
        key = self._route(scope, connection) if key is None else key
        wait = self.request_timeout if timeout is None else timeout
        reply: Reply = decode_reply(self.link.request(body, wait, key))
        if not reply.ok:
            status = reply.result.get("status") if isinstance(reply.result, Mapping) else None
            if status == "not_registered":
                raise NotRegisteredError(reply.error or "not registered")
            raise CommandRejectedError(str(status or "invalid"), reply.error or "query refused")
        return reply.result

    def _command(
        self,
        op: str,
        connection: str | None,
        scope: str | None,
        *,
        reason: str | None = None,
        options: Mapping[str, Any] | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Validate, encode (no pydantic model on the way out, see ``command_body``) and
        send: without ``wait`` the call returns once the broker confirmed the command,
        or at once while the broker is away (buffered, see ``buffer_size``)."""
        body, ident = command_body(
            op, connection, scope, reason, options, now_ms=wall_clock_ms()
        )
        key = self._route(scope, connection)
        if wait:
            return self._applied(body, key)
        self._post(body, key, ident)
        return None

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every command sent without ``wait`` is confirmed by the broker
        (they are buffered while it is away); False if some are still waiting."""
        link: Any = self._link
        if link is None or not hasattr(link, "flush"):
            return True
        return bool(link.flush(timeout))

    def pending(self) -> int:
        """Commands sent without ``wait`` that the broker has not confirmed yet."""
        link: Any = self._link
        if link is None or not hasattr(link, "pending"):
            return 0
        return int(link.pending())

    # ------------------------------------------------------------------ commands
    def register(
        self,
        connection: str,
        *,
        scope: str | None = None,
        wait: bool = False,
        strict: bool = False,
        **options: Any,
    ) -> Applied | None:
        """Register a connection; options are the policy (``max_attempts``, ``expiry_ms``…).

        A duplicate changes nothing; with ``wait=True, strict=True`` it raises
        AlreadyRegisteredError.
        """
        _check_options(options)
        applied = self._command("register", connection, scope, options=options, wait=wait)
        if strict and applied is not None and applied.status == "already_registered":
            raise AlreadyRegisteredError(f"{connection!r} is already registered")
        return applied

    def unregister(
        self, connection: str, *, scope: str | None = None, wait: bool = False
    ) -> Applied | None:
        return self._command("unregister", connection, scope, wait=wait)

    def success(
        self,
        connection: str,
        *,
        scope: str | None = None,
        lease: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        options = {"lease": lease} if lease else None
        return self._command("success", connection, scope, options=options, wait=wait)

    def failure(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        lease: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        options = {"lease": lease} if lease else None
        return self._command(
            "failure", connection, scope, reason=reason, options=options, wait=wait
        )

    def open(
        self,
        connection: str,
        *,
        scope: str | None = None,
        expiry_ms: int | None = _UNSET,
        reason: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Open by hand; ``expiry_ms=None`` keeps it open until ``close``/``reset``."""
        options = {} if expiry_ms is _UNSET else {"expiry_ms": expiry_ms}
        if expiry_ms is not _UNSET and expiry_ms is not None:
            _check_options({"expiry_ms": expiry_ms})
        return self._command("open", connection, scope, reason=reason, options=options, wait=wait)

    def close(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Close by hand (the failure count starts again from zero)."""
        return self._command("close", connection, scope, reason=reason, wait=wait)

    def reset(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        return self._command("reset", connection, scope, reason=reason, wait=wait)

    def configure(
        self,
        connection: str | None = None,
        *,
        scope: str | None = None,
        wait: bool = False,
        **options: Any,
    ) -> Applied | None:
        """Change some policy options of one connection (or, with no connection, the defaults)."""
        if not options:
            raise PolicyError("options", options, "configure needs at least one option")
        _check_options(options)
        return self._command("configure", connection, scope, options=options, wait=wait)

    # ------------------------------------------------------------------ queries
    def status(self, connection: str, *, scope: str | None = None) -> dict[str, Any]:
        check_names(scope, connection)
        result: dict[str, Any] = self._query("status", connection, scope)
        return result

    def snapshot(
        self, scope: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Status of every connection (or one scope's), gathered across shards.

        ``timeout``: seconds to wait for each shard's answer (default ``request_timeout``).
        """
        shards = self.transport.topology.shards
        out: list[dict[str, Any]] = []
        for k in range(shards):
            key = "owner" if shards <= 1 else f"owner.{k}"
            result = self._query("snapshot", None, scope, timeout=timeout, key=key)
            out.extend(result["connections"])
        return out

    def acquire_probe(
        self, connection: str, *, scope: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ask for one of the half-open trial calls (granted at once when closed)."""
        result: dict[str, Any] = self._query("acquire_probe", connection, scope, timeout=timeout)
        return result

    def release_probe(self, connection: str, lease: str, *, scope: str | None = None) -> bool:
        return bool(self._query("release_probe", connection, scope, lease=lease)["released"])

    def available(self, connection: str, *, scope: str | None = None) -> bool:
        """Closed or half-open: from the local view when one runs, else asked of the owner."""
        view = self.local_view
        if view is not None:
            state = view.state(connection, scope)
            if state is not None:
                return bool(state != OPEN)
        return bool(self.status(connection, scope=scope)["state"] != OPEN)

    # ------------------------------------------------------------------ guards
    def _guard_for(
        self, connection: str, scope: str | None, record: Any, ignore: Any
    ) -> Guard:
        cache_key: tuple[Any, ...] = (connection, scope, record, ignore)
        try:
            guard = self._guards.get(cache_key)
        except TypeError:  # unhashable record/ignore (a list): build without caching
            cache_key, guard = (), None
        if guard is None:
            from brama_mq.client.guard import Guard

            guard = Guard(self, connection, scope, record=record, ignore=ignore)
            if cache_key:
                self._guards[cache_key] = guard
        return guard

    def guard(
        self,
        connection: str,
        *,
        scope: str | None = None,
        record: Any = (Exception,),
        ignore: Any = (),
    ) -> GuardedCall:
        """Guard a block: ``with client.guard("payment_api", scope="payments"):``.

        Before the block: closed -> run; open -> CircuitOpenError (with the time left);
        half-open -> run only with a probe permit from the owner. After it: the outcome
        is reported in the background (``record``: exceptions that are failures;
        ``ignore``: exceptions that report nothing; others count as success). The first
        guard in a process starts its local view (see :mod:`brama_mq.client.guard`).
        Works as ``async with`` too.
        """
        return self._guard_for(connection, scope, record, ignore).call()

    def guarded(
        self,
        connection: str,
        *,
        scope: str | None = None,
        record: Any = (Exception,),
        ignore: Any = (),
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`guard` for plain and ``async`` functions."""
        return self._guard_for(connection, scope, record, ignore).decorate

    # ------------------------------------------------------------------ lifecycle
    def disconnect(self) -> None:
        runtime, self._guard_runtime = self._guard_runtime, None
        if runtime is not None:
            runtime.close()
            if self.local_view is runtime.view:
                self.local_view = None
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._owns_transport:
            self.transport.close()

    def __enter__(self) -> Brama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


_CLIENTS: weakref.WeakSet[Brama] = weakref.WeakSet()
#: Links of a parent process, inherited by fork: kept referenced, never used or closed.
_INHERITED: list[Any] = []


def _after_fork() -> None:
    # The parent's link (socket, I/O thread) is not this process's: the next command
    # opens a new one. Closing it here would talk on the parent's connection.
    for client in list(_CLIENTS):
        if client._link is not None:
            _INHERITED.append(client._link)
            client._link = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _check_options(options: Mapping[str, Any]) -> None:
    """Validate policy options here, so the caller hears about a bad one at once."""
    DEFAULT_POLICY.updated(options)
    if "metadata" in options:
        check_metadata(options["metadata"])
