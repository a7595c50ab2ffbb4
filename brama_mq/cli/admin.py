"""Admin commands of ``brama-mq``: status and the commands that steer breakers.

Each one talks to the running owner over RPC (``wait=True``), so when it returns the
owner has applied the command and its critical events are confirmed.
Exit codes: 0 ok, 1 failed, 2 bad usage or settings, 3 not registered, 4 no owner answered.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, NoReturn, TypeVar

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.table import Table

from brama_mq.cli.options import shards_option, tls_options
from brama_mq.client.brama import Applied, Brama
from brama_mq.core.policy import MODES, OPTION_NAMES
from brama_mq.errors import (
    BramaError,
    CommandRejectedError,
    InvalidNameError,
    NoTopologyError,
    NotRegisteredError,
    PolicyError,
    RequestTimeoutError,
    TransportError,
    breaker_name,
    plural,
)
from brama_mq.settings import Settings, SettingsError
from brama_mq.transport import Transport, transport_for

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_REGISTERED = 3
EXIT_NO_OWNER = 4

F = TypeVar("F", bound=Callable[..., Any])


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"brama-mq: {message}", err=True)
    sys.exit(code)


def connection_options(func: F) -> F:
    """Options every admin command shares."""
    for option in reversed(
        [
            click.option(
                "--broker", "broker_url", default=None, help="Broker URL [env BRAMA_BROKER_URL]."
            ),
            click.option("--prefix", default=None, help="Name prefix [env BRAMA_PREFIX]."),
            click.option(
                "--timeout",
                default=5.0,
                show_default=True,
                help="Seconds to wait for the owner's answer.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Print JSON."),
            shards_option,
            tls_options,
        ]
    ):
        func = option(func)
    return func


@contextmanager
def _client(
    broker_url: str | None, prefix: str | None, timeout: float, *, read_only: bool = False
) -> Iterator[Brama]:
    """A client, with every brama_mq error turned into a one-line message and exit code.

    ``read_only`` (status): declare nothing; a prefix without a topology is reported
    (exit 4) instead of created, so a typo leaves no queues behind.
    """
    try:
        settings = Settings.from_env(broker_url=broker_url, prefix=prefix)
    except SettingsError as exc:
        _die(str(exc), EXIT_USAGE)
    transport = read_only_transport(settings) if read_only else None
    try:
        client = Brama(settings=settings, transport=transport, request_timeout=timeout)
    except NoTopologyError as exc:
        _close(transport)
        _die(str(exc), EXIT_NO_OWNER)
    except BramaError as exc:
        _close(transport)
        _die(f"{exc} (is the broker up? check --broker / BRAMA_BROKER_URL)", EXIT_FAILED)
    try:
        yield client
    except (InvalidNameError, PolicyError) as exc:
        _die(str(exc), EXIT_USAGE)
    except NotRegisteredError as exc:
        _die(f"{exc} (register it first: brama-mq register NAME)", EXIT_NOT_REGISTERED)
    except RequestTimeoutError:
        _die(
            f"no owner answered within {timeout} s on prefix {settings.prefix!r} "
            "(is `brama-mq worker` running?)",
            EXIT_NO_OWNER,
        )
    except CommandRejectedError as exc:
        _die(f"the owner refused it: {exc}", EXIT_FAILED)
    except TransportError as exc:
        _die(
            f"{exc} (broker {settings.safe_broker_url}: is it up? check --broker / "
            "BRAMA_BROKER_URL)",
            EXIT_FAILED,
        )
    except NoTopologyError as exc:
        _die(str(exc), EXIT_NO_OWNER)
    except BramaError as exc:  # e.g. ShardMismatchError: the message says what to set
        _die(str(exc), EXIT_FAILED)
    finally:
        client.disconnect()
        _close(transport)


def read_only_transport(settings: Settings) -> Transport:
    """A transport that declares nothing when the topology is missing (status, watch)."""
    return transport_for(settings, bootstrap=False)


def _close(transport: Transport | None) -> None:
    if transport is not None:
        with suppress(BramaError):
            transport.close()


def _print_applied(applied: Applied | None, as_json: bool, what: str) -> None:
    if applied is None:
        return
    if as_json:
        click.echo(
            json.dumps(
                {"status": applied.status, "events": [e.model_dump() for e in applied.events]}
            )
        )
        return
    names = ", ".join(applied.event_names) or "no events"
    click.echo(f"{what}: {applied.status} ({names})")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            _die(f"--option takes key=value, got {pair!r}", EXIT_USAGE)
        if key not in OPTION_NAMES:
            _die(f"unknown option {key!r}; valid: {', '.join(OPTION_NAMES)}", EXIT_USAGE)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


_OPTION_HELP = "Policy option as key=value (repeatable): " + ", ".join(OPTION_NAMES)
_SCOPE_HELP = "The connection's scope (omit for a connection registered without one)."


@click.command()
@click.option("--scope", default=None, help="Only this scope's breakers.")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(["closed", "open", "half_open"]),
    help="Only breakers in this state (repeatable).",
)
@connection_options
def status(
    scope: str | None,
    states: tuple[str, ...],
    broker_url: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """A table of every breaker: state, failures, time left open; its mode when one is
    not normal, and failure rates when one has a window (--json rows carry them all).

    \b
    Examples:
      brama-mq status
      brama-mq status --scope payments --json
      brama-mq status --state open --state half_open
      brama-mq status --json | jq -r '.[] | select(.state=="open") | .connection'
    """
    with _client(broker_url, prefix, timeout, read_only=True) as client:
        rows = client.snapshot(scope)
    if states:
        rows = [row for row in rows if row["state"] in states]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        where = f" in scope {scope!r}" if scope is not None else ""
        click.echo(f"no breakers{where} (register one: brama-mq register NAME)")
        return
    table = Table(title=plural(len(rows), "breaker"))
    # Columns only some breakers fill in are shown when one does (80 columns go fast).
    moded = any((row.get("mode") or "normal") != "normal" for row in rows)
    rated = any(_rate(row, "failure_rate") or _rate(row, "slow_call_rate") for row in rows)
    columns = ["scope", "connection", "state", *(["mode"] if moded else []), "failures"]
    columns += ["failure rate"] if rated else []
    for column in (*columns, "time left open", "policy"):
        table.add_column(column)
    now = time.time() * 1000
    for row in sorted(rows, key=lambda r: (str(r["scope"]), r["connection"])):
        left = "-"
        if row["state"] == "open":
            until = row.get("open_until")
            left = "until closed" if until is None else f"{max(0, until - now) / 1000:.1f} s"
        policy = row.get("policy", {})
        cells = [
            str(row["scope"] or "-"),
            row["connection"],
            row["state"],
            *([str(row.get("mode") or "normal")] if moded else []),
            # consecutive: failures of max_attempts; a window's count stands alone
            str(row["failure_count"]) if policy.get("strategy") == "failure_rate"
            else f"{row['failure_count']}/{row['max_attempts']}",
        ]
        if rated:
            cells.append(_rates(row))
        table.add_row(
            *cells,
            left,
            f"expiry {policy.get('expiry_ms')} ms, {policy.get('strategy')}",
        )
    Console().print(table)


def _rate(row: dict[str, Any], name: str) -> str | None:
    """A status row's rate (percent over its window) as text, None when it has none."""
    value = row.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return f"{value:.1f}%"


def _rates(row: dict[str, Any]) -> str:
    """The failure rate, and the slow-call rate when calls are timed, of a status row."""
    failed, slow = _rate(row, "failure_rate"), _rate(row, "slow_call_rate")
    parts = ([failed] if failed else []) + ([f"slow {slow}"] if slow else [])
    return ", ".join(parts) or "-"


@click.command()
@click.argument("connection")
@click.option("--scope", default=None, help=_SCOPE_HELP)
@click.option("--option", "-o", "options", multiple=True, help=_OPTION_HELP)
@connection_options
def register(
    connection: str,
    scope: str | None,
    options: tuple[str, ...],
    broker_url: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Register a connection (a duplicate changes nothing).

    \b
    Examples:
      brama-mq register payment_api --scope payments -o max_attempts=3 -o expiry_ms=30000
    """
    opts = _parse_options(options)
    with _client(broker_url, prefix, timeout) as client:
        _print_applied(
            client.register(connection, scope=scope, wait=True, **opts), as_json, "register"
        )


@click.command()
@click.argument("connection", required=False)
@click.option("--scope", default=None, help=_SCOPE_HELP)
@click.option("--option", "-o", "options", multiple=True, required=True, help=_OPTION_HELP)
@connection_options
def configure(
    connection: str | None,
    scope: str | None,
    options: tuple[str, ...],
    broker_url: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Change policy options of a connection (no CONNECTION: the defaults for new ones).

    \b
    Examples:
      brama-mq configure payment_api --scope payments -o expiry_ms=10000
      brama-mq configure -o max_attempts=10
    """
    opts = _parse_options(options)
    with _client(broker_url, prefix, timeout) as client:
        _print_applied(
            client.configure(connection, scope=scope, wait=True, **opts), as_json, "configure"
        )


def _simple(op: str, doc: str) -> click.Command:
    @click.command(name=op, help=doc)
    @click.argument("connection")
    @click.option("--scope", default=None, help=_SCOPE_HELP)
    @click.option("--reason", default=None, help="Why (shows in the events).")
    @connection_options
    def command(
        connection: str,
        scope: str | None,
        reason: str | None,
        broker_url: str | None,
        prefix: str | None,
        timeout: float,
        as_json: bool,
    ) -> None:
        with _client(broker_url, prefix, timeout) as client:
            kwargs: dict[str, Any] = {"scope": scope, "wait": True}
            if op != "unregister":
                kwargs["reason"] = reason
            _print_applied(getattr(client, op)(connection, **kwargs), as_json, op)

    return command


unregister = _simple(
    "unregister", "Remove a connection.\n\n\b\nExamples:\n  brama-mq unregister payment_api"
)
close = _simple(
    "close",
    "Close a circuit by hand (the failure count restarts).\n\n\b\nExamples:\n"
    "  brama-mq close payment_api --scope payments --reason 'fixed upstream'",
)
reset = _simple(
    "reset", "Reset a circuit: closed, count 0.\n\n\b\nExamples:\n  brama-mq reset payment_api"
)


@click.command(name="open")
@click.argument("connection")
@click.option("--scope", default=None, help=_SCOPE_HELP)
@click.option("--reason", default=None, help="Why (shows in the events).")
@click.option("--expiry-ms", type=int, default=None, help="Open for this long (default: policy).")
@click.option("--until-closed", is_flag=True, help="Stay open until closed by hand.")
@connection_options
def open_(
    connection: str,
    scope: str | None,
    reason: str | None,
    expiry_ms: int | None,
    until_closed: bool,
    broker_url: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Open a circuit by hand.

    \b
    Examples:
      brama-mq open payment_api --scope payments --until-closed --reason maintenance
      brama-mq open ledger_db --expiry-ms 5000
    """
    if until_closed and expiry_ms is not None:
        _die("--expiry-ms and --until-closed exclude each other", EXIT_USAGE)
    kwargs: dict[str, Any] = {"scope": scope, "reason": reason, "wait": True}
    if until_closed:
        kwargs["expiry_ms"] = None
    elif expiry_ms is not None:
        kwargs["expiry_ms"] = expiry_ms
    with _client(broker_url, prefix, timeout) as client:
        _print_applied(client.open(connection, **kwargs), as_json, "open")


def _complete_mode(
    _ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    return [CompletionItem(m) for m in MODES if m.startswith(incomplete)]


@click.command(name="mode")
@click.argument("connection")
@click.argument("mode", metavar="MODE", shell_complete=_complete_mode)
@click.option("--scope", default=None, help=_SCOPE_HELP)
@connection_options
def mode_(
    connection: str,
    mode: str,
    scope: str | None,
    broker_url: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Set a connection's operating mode (configure's option mode).

    \b
    MODE is one of:
      normal        the breaker follows its policy (the default)
      disabled      every call allowed, outcomes counted, the circuit never opens
      forced_open   every call refused until the mode changes (held open)
      metrics_only  every call allowed, outcomes and events as usual, never opens
                    (outcomes that would have opened it say so: data.would_open)

    \b
    Examples:
      brama-mq mode payment_api forced_open --scope payments
      brama-mq mode payment_api normal --scope payments --json
    """
    if mode not in MODES:
        _die(f"unknown mode {mode!r}; valid: {', '.join(MODES)}", EXIT_USAGE)
    with _client(broker_url, prefix, timeout) as client:
        applied = client.configure(connection, scope=scope, wait=True, mode=mode)
    if applied is None:
        return
    if as_json:
        _print_applied(applied, as_json, "mode")
        return
    name = breaker_name(scope, connection)
    change = next((e for e in applied.events if e.reason == "mode"), None)
    if change is None:
        click.echo(f"mode: {applied.status}; {name} was already {mode} (no events)")
        return
    previous = change.data.get("previous_mode", "?")
    names = ", ".join(applied.event_names)
    click.echo(
        f"mode: {applied.status}; {name} mode {previous} -> {change.mode}, state "
        f"{change.previous_state} -> {change.new_state} ({names})"
    )


ADMIN_COMMANDS: list[click.Command] = [
    status,
    register,
    unregister,
    open_,
    close,
    reset,
    configure,
    mode_,
]
