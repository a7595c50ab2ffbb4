"""The ``Brama`` client: report outcomes, steer circuits, ask the owner.

Everything a command needs is checked here, before anything is sent, so a typo fails
in the caller's stack with the bad value named, not later in a dead-letter queue. The
sending (the link, shard routing, posts and RPCs) is :class:`~brama_mq.client.link.
CommandLink`'s, which the outbox and the guards share without knowing this class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from brama_mq.client.guard import Guard, GuardedCall, GuardRuntime
from brama_mq.client.link import Applied, CommandLink
from brama_mq.client.local_view import LocalView
from brama_mq.core.events import OPEN
from brama_mq.core.policy import DEFAULT_POLICY, check_duration, check_metadata, check_reporter
from brama_mq.core.routing import check_names
from brama_mq.errors import AlreadyRegisteredError, PolicyError
from brama_mq.settings import Settings
from brama_mq.transport import Transport, transport_for
from brama_mq.transport.base import ClientLink

__all__ = ["Applied", "Brama"]

_UNSET: Any = object()
F = TypeVar("F", bound=Callable[..., Any])


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
        reporter: str | None = None,
    ) -> None:
        """``buffer_size``: commands sent without ``wait`` that may wait for the broker's
        confirm (while it is away, until it is back); one more raises OutboxFullError.
        Default ``BRAMA_CLIENT_BUFFER`` (10,000).

        ``reporter``: the name every ``success``/``failure`` of this client carries
        (policies with ``min_reporters`` open only on failures from that many distinct
        reporters). Default ``BRAMA_REPORTER``, else ``<host>:<pid>`` of the process
        sending (recomputed after ``fork()``). A fixed name is the same in every
        process that uses it: they count as one reporter (e.g. one per host)."""
        if reporter is not None:
            check_reporter(reporter)
        if settings is None:
            settings = Settings.from_env(
                broker_url=broker_url, prefix=prefix, shards=shards, client_buffer=buffer_size
            )
        elif buffer_size is not None:
            settings = replace(settings, client_buffer=buffer_size)
        self.settings = settings
        self._owns_transport = transport is None
        if transport is None:
            transport = transport_for(settings)
        self.transport = transport
        #: The way to the owner: the link, shard routing, posted commands and RPCs.
        self.commands = CommandLink(
            transport,
            request_timeout=request_timeout,
            max_buffer=settings.client_buffer,
            reporter=settings.reporter if reporter is None else reporter,
        )
        self.local_view: LocalView | None = None  # set by brama_mq.celery / LocalView.attach
        self.guard_runtime: GuardRuntime | None = None  # set by brama_mq.client.guard
        self._guards: dict[tuple[Any, ...], Guard] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def request_timeout(self) -> float:
        """Seconds a request to the owner (``wait=True``, a query) waits by default."""
        return self.commands.request_timeout

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        self.commands.request_timeout = value

    @property
    def reporter(self) -> str:
        """The ``reporter`` this client's outcome reports carry in this process."""
        return self.commands.reporter

    @property
    def link(self) -> ClientLink:
        """This process's link to the broker, opened on first use."""
        return self.commands.link

    def connect(self) -> Brama:
        """Connect now instead of at the first call, to fail at start-up: an unreachable
        broker, refused credentials or permissions, a TLS certificate not accepted, or a
        shard count other than the broker's record (:class:`ShardMismatchError`, naming
        both counts) raise here. Local views and Celery guards connect at start anyway."""
        _ = self.commands.link
        return self

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every command sent without ``wait`` is confirmed by the broker
        (they are buffered while it is away); False if some are still waiting."""
        return self.commands.flush(timeout)

    def pending(self) -> int:
        """Commands sent without ``wait`` that the broker has not confirmed yet."""
        return self.commands.pending()

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
        applied = self.commands.command("register", connection, scope, options=options,
                                        wait=wait)
        if strict and applied is not None and applied.status == "already_registered":
            raise AlreadyRegisteredError(f"{connection!r} is already registered")
        return applied

    def unregister(
        self, connection: str, *, scope: str | None = None, wait: bool = False
    ) -> Applied | None:
        return self.commands.command("unregister", connection, scope, wait=wait)

    def success(
        self,
        connection: str,
        *,
        scope: str | None = None,
        lease: str | None = None,
        duration_ms: float | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Report a successful call. ``duration_ms``: how long it took (a number >= 0,
        checked here: PolicyError naming it), so a policy with ``slow_call_ms`` can
        count it as slow. The report carries this client's :attr:`reporter`."""
        return self.commands.command(
            "success", connection, scope, options=self._outcome(lease, duration_ms),
            wait=wait,
        )

    def failure(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        lease: str | None = None,
        duration_ms: float | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Report a failed call; ``duration_ms`` and the reporter as for :meth:`success`."""
        return self.commands.command(
            "failure", connection, scope, reason=reason,
            options=self._outcome(lease, duration_ms), wait=wait,
        )

    def _outcome(self, lease: str | None, duration_ms: float | None) -> dict[str, Any]:
        """The options of an outcome report: always the reporter, the rest when given."""
        options: dict[str, Any] = {"reporter": self.commands.reporter}
        if lease:
            options["lease"] = lease
        if duration_ms is not None:
            options["duration_ms"] = check_duration(duration_ms)
        return options

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
        return self.commands.command(
            "open", connection, scope, reason=reason, options=options, wait=wait
        )

    def close(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        """Close by hand (the failure count starts again from zero)."""
        return self.commands.command("close", connection, scope, reason=reason, wait=wait)

    def reset(
        self,
        connection: str,
        *,
        scope: str | None = None,
        reason: str | None = None,
        wait: bool = False,
    ) -> Applied | None:
        return self.commands.command("reset", connection, scope, reason=reason, wait=wait)

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
        return self.commands.command("configure", connection, scope, options=options, wait=wait)

    # ------------------------------------------------------------------ queries
    def status(self, connection: str, *, scope: str | None = None) -> dict[str, Any]:
        check_names(scope, connection)
        result: dict[str, Any] = self.commands.query("status", connection, scope)
        return result

    def snapshot(
        self, scope: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Status of every connection (or one scope's), gathered across shards.

        ``timeout``: seconds to wait for each shard's answer (default ``request_timeout``).
        """
        return self.commands.snapshot(scope, timeout=timeout)

    def acquire_probe(
        self, connection: str, *, scope: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ask for one of the half-open trial calls (granted at once when closed)."""
        result: dict[str, Any] = self.commands.query(
            "acquire_probe", connection, scope, timeout=timeout
        )
        return result

    def release_probe(self, connection: str, lease: str, *, scope: str | None = None) -> bool:
        answer = self.commands.query("release_probe", connection, scope, lease=lease)
        return bool(answer["released"])

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

        Before the block: closed -> run; open (also mode ``forced_open``) ->
        CircuitOpenError (with the time left); half-open -> run only with a probe permit
        from the owner. After it: the outcome and how long the block took
        (``duration_ms``, timed here with ``time.monotonic()``) are reported in the
        background (``record``: exceptions that are failures; ``ignore``: exceptions
        that report nothing; others count as success). The first guard in a process
        starts its local view (see :mod:`brama_mq.client.guard`). Works as
        ``async with`` too.
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
        runtime, self.guard_runtime = self.guard_runtime, None
        if runtime is not None:
            runtime.close()
            if self.local_view is runtime.view:
                self.local_view = None
        self.commands.close()
        if self._owns_transport:
            self.transport.close()

    def __enter__(self) -> Brama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


def _check_options(options: Mapping[str, Any]) -> None:
    """Validate policy options here, so the caller hears about a bad one at once."""
    DEFAULT_POLICY.updated(options)
    if "metadata" in options:
        check_metadata(options["metadata"])
