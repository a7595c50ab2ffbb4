"""``brama-mq``: the command group and its commands demo, worker, watch and completion
(the admin commands come from :mod:`brama_mq.cli.admin`).

Exit codes scripts can rely on: 0 ok, 1 the operation failed (broker away, refused),
2 bad usage or settings, 3 not registered, 4 no owner answered (admin commands).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Any

import click

from brama_mq.cli.options import shards_option, tls_options
from brama_mq.errors import BramaError
from brama_mq.settings import MEMORY_URL, Settings, SettingsError

EXIT_FAILED = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"brama-mq: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brama-mq")
def main() -> None:
    """Circuit breakers and status notifications over RabbitMQ.

    Settings come from flags, else BRAMA_BROKER_URL, BRAMA_PREFIX, BRAMA_SHARDS.
    Commands that print data take --json.

    \b
    Exit codes:
      0  ok
      1  the operation failed (broker unreachable, command refused)
      2  bad usage or settings
      3  the connection is not registered
      4  no owner answered (is `brama-mq worker` running?)

    \b
    Examples:
      brama-mq demo                       # everything in one process, no broker
      brama-mq worker --metrics-port 9464
      brama-mq status --scope payments
      eval "$(brama-mq completion bash)"  # tab completion
    """


@main.command()
@click.option(
    "--broker",
    default=MEMORY_URL,
    show_default=True,
    help="Broker URL; the default runs on the embedded in-process transport.",
)
@click.option("--prefix", default=None, help="Name prefix (default: a fresh demo prefix).")
@click.option("--seconds", default=8.0, show_default=True, help="How long the demo runs.")
@click.option("--seed", default=7, show_default=True, help="Seed of the simulated failures.")
@click.option("--plain", is_flag=True, help="Print lines instead of a live table.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only what the demo saw, as one JSON object, at the end.")
def demo(
    broker: str, prefix: str | None, seconds: float, seed: int, plain: bool, as_json: bool
) -> None:
    """Run an owner, a client and a subscriber against a simulated flaky service.

    \b
    Examples:
      brama-mq demo
      brama-mq demo --broker amqp://guest:guest@127.0.0.1:5672// --seconds 5
      brama-mq demo --json --seconds 4 | jq .transitions
    """
    from brama_mq.cli.demo import run_demo

    quiet = {}
    if as_json:
        import io

        from rich.console import Console

        quiet = {"console": Console(file=io.StringIO())}
    try:
        report = run_demo(
            broker_url=broker,
            prefix=prefix,
            seconds=seconds,
            seed=seed,
            live=False if plain or as_json else None,
            **quiet,
        )
    except BramaError as exc:
        _fail(str(exc))
    if as_json:
        import json

        click.echo(json.dumps({"events": dict(report.events), "calls": dict(report.calls),
                               "transitions": report.transitions, "states": report.states}))
    if not report.transitions:
        _fail("the demo saw no state change; something is wrong (try a longer --seconds)")


@main.command()
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Broker URL [env BRAMA_BROKER_URL; default amqp://guest:**@127.0.0.1:5672//].",
)
@click.option("--prefix", default=None, help="Name prefix [env BRAMA_PREFIX; default brama].")
@click.option("--shard", type=int, default=None, help="Serve this shard (with BRAMA_SHARDS > 1).")
@click.option("--shards", type=int, default=None, help="Number of shards [env BRAMA_SHARDS].")
@click.option("--prefetch", type=int, default=None, help="Prefetch window [env BRAMA_PREFETCH].")
@click.option("--log-level", default=None, help="Log level [env BRAMA_LOG_LEVEL; default INFO].")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, envvar="BRAMA_METRICS_PORT",
    help="Serve Prometheus /metrics on this port [env BRAMA_METRICS_PORT; default off].",
)
@click.option(
    "--otel", is_flag=True, envvar="BRAMA_OTEL",
    help="Record the same metrics on the global OpenTelemetry meter provider "
    "(e.g. under opentelemetry-instrument) [env BRAMA_OTEL].",
)
@tls_options
@click.option(
    "--reconnect-timeout", type=str, default=None, metavar="SECONDS",
    help="Seconds one reconnect round lasts before the outage is logged and a new round "
    "starts; the worker never gives up [env BRAMA_RECONNECT_TIMEOUT; default 60].",
)
@click.option(
    "--snapshot-interval", type=str, default=None, metavar="SECONDS",
    help="Seconds between registry snapshots [env BRAMA_SNAPSHOT_INTERVAL; default 10].",
)
@click.option(
    "--heartbeat", type=float, default=None,
    help="AMQP heartbeat in seconds, 0 for off; the owner's lease is half of it: an owner "
    "without a broker round trip for that long stops acting and reconnects "
    "[env BRAMA_HEARTBEAT; default 10].",
)
def worker(
    broker_url: str | None,
    prefix: str | None,
    shard: int | None,
    shards: int | None,
    prefetch: int | None,
    log_level: str | None,
    reconnect_timeout: str | None,
    snapshot_interval: str | None,
    heartbeat: float | None,
    metrics_port: int | None,
    otel: bool,
) -> None:
    """Run a state owner: consume commands, run the breakers, publish events.

    Several workers may run; the single-active-consumer queue picks the active one and
    the others stay hot standbys (they replay the journal). SIGTERM finishes and
    acknowledges the batch in hand, then exits 0. Once connected, a broker outage never
    ends the worker: it reconnects with capped backoff for as long as it takes.

    \b
    Examples:
      brama-mq worker
      BRAMA_BROKER_URL=amqp://user:pass@rabbit:5672/prod brama-mq worker --prefix brama
      brama-mq worker --metrics-port 9464     # Prometheus: http://host:9464/metrics
      opentelemetry-instrument brama-mq worker --otel
    """
    from brama_mq.owner import Owner
    from brama_mq.transport import transport_for

    try:
        settings = Settings.from_env(
            broker_url=broker_url,
            prefix=prefix,
            shards=shards,
            prefetch=prefetch,
            log_level=log_level,
            heartbeat=heartbeat,
        )
        reconnect_s = _seconds("reconnect-timeout", reconnect_timeout,
                               "BRAMA_RECONNECT_TIMEOUT", 60.0)
        snapshot_s = _seconds("snapshot-interval", snapshot_interval,
                              "BRAMA_SNAPSHOT_INTERVAL", 10.0)
    except SettingsError as exc:
        _fail(str(exc), EXIT_USAGE)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if shard is not None and not 0 <= shard < settings.shards:
        _fail(f"--shard {shard} is outside 0..{settings.shards - 1}", EXIT_USAGE)
    if shard is None and settings.shards > 1:
        _fail(f"--shard is required with {settings.shards} shards (one worker per shard)",
              EXIT_USAGE)
    try:
        transport = transport_for(settings, reconnect_timeout=reconnect_s)
        owner = Owner(
            transport,
            prefetch=settings.prefetch,
            shard=shard,
            max_command_bytes=settings.max_command_bytes,
            snapshot_interval=snapshot_s,
        )

        def _stop(signum: int, _frame: Any) -> None:
            logging.getLogger("brama_mq.owner").info(
                "signal %d: finishing the batch in hand", signum
            )
            owner.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        logging.getLogger("brama_mq.owner").info(
            "worker starting: broker %s, prefix %s, heartbeat %g s, lease %g s",
            settings.safe_broker_url, settings.prefix, settings.heartbeat, owner.lease,
        )
        metrics = _serve_metrics(owner, metrics_port) if metrics_port is not None else None
        if settings.shards > 1 or settings.tls:
            logging.getLogger("brama_mq.owner").info(
                "shard %d of %d%s", shard or 0, settings.shards,
                ", TLS" + ("" if settings.tls_verify else " without verification")
                if settings.tls else "",
            )
        meter = _otel_metrics(owner, probe=metrics is None) if otel else None
        owner.run()
        logging.getLogger("brama_mq.owner").info("worker stopped: %s", owner.stats.summary())
        if metrics is not None:
            metrics.close()
        if meter is not None:
            meter.close()
        transport.close()
    except BramaError as exc:
        _fail(f"{exc} (broker {settings.safe_broker_url})")


def _seconds(flag: str, value: str | None, env: str, default: float) -> float:
    """A positive number of seconds from ``--flag`` or ``env``; SettingsError names it."""
    import os

    raw = value if value is not None else os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        where = f"--{flag}" if value is not None else env
        raise SettingsError(f"{where}={raw!r}: expected a positive number of seconds")
    return seconds


def _serve_metrics(owner: Any, port: int) -> Any:
    """Start the worker's /metrics endpoint, or exit 2 saying what is missing."""
    try:
        from brama_mq.metrics.prometheus import serve_owner_metrics

        return serve_owner_metrics(owner, port)
    except RuntimeError as exc:  # prometheus_client missing
        _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        _fail(f"cannot serve metrics on port {port}: {exc.strerror or exc} "
              "(pick another --metrics-port)", EXIT_USAGE)


def _otel_metrics(owner: Any, *, probe: bool) -> Any:
    """Attach the OpenTelemetry meter (and the activity probe, if /metrics did not)."""
    try:
        from brama_mq.metrics.otel import attach_to_owner

        return attach_to_owner(owner, probe=probe)
    except RuntimeError as exc:  # opentelemetry-api missing
        _fail(str(exc), EXIT_USAGE)


@main.command()
@click.option("--broker", "broker_url", default=None, help="Broker URL [env BRAMA_BROKER_URL].")
@click.option("--prefix", default=None, help="Name prefix [env BRAMA_PREFIX].")
@click.option("--scope", multiple=True, help="Only this scope (repeat for several).")
@click.option("--connection", multiple=True, help="Only this connection (repeat for several).")
@click.option(
    "--events", multiple=True, help="Only these event types (comma-separated or repeated)."
)
@click.option(
    "--pattern", "patterns", multiple=True,
    help="A raw topic binding, e.g. 'payments.#' or '*.*.circuit_opened' (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="One event per line as JSON.")
@click.option("--count", type=int, default=None, help="Stop after this many events.")
@click.option("--seconds", type=float, default=None, help="Stop after this many seconds.")
@click.option("--plain", is_flag=True, help="Print one line per event instead of a live view.")
@shards_option
@tls_options
def watch(
    broker_url: str | None,
    prefix: str | None,
    scope: tuple[str, ...],
    connection: tuple[str, ...],
    events: tuple[str, ...],
    patterns: tuple[str, ...],
    as_json: bool,
    count: int | None,
    seconds: float | None,
    plain: bool,
) -> None:
    """Show events as they happen and the current state of each connection.

    Filters combine like subscribe(): the cross product of --scope, --connection and
    --events; --pattern adds raw bindings. Ctrl-C (or SIGTERM) stops it.

    \b
    Examples:
      brama-mq watch
      brama-mq watch --scope payments --events state_change,circuit_opened
      brama-mq watch --connection payment_api --json | jq -r .data.state
      brama-mq watch --pattern '*.*.circuit_opened'
    """
    from brama_mq.cli.watch import run_watch
    from brama_mq.errors import FilterError

    try:
        settings = Settings.from_env(broker_url=broker_url, prefix=prefix)
    except SettingsError as exc:
        _fail(str(exc), EXIT_USAGE)
    if settings.broker_url.startswith(MEMORY_URL):
        _fail("watch needs a broker: the embedded transport lives inside one process",
              EXIT_USAGE)
    names = [name.strip() for item in events for name in item.split(",") if name.strip()]

    def _interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    from brama_mq.cli.admin import EXIT_NO_OWNER, read_only_transport
    from brama_mq.errors import NoTopologyError

    transport = read_only_transport(settings)  # a mistyped prefix declares nothing
    try:
        run_watch(
            transport=transport,
            scope=scope,
            connection=connection,
            events=names,
            patterns=patterns,
            as_json=as_json,
            count=count,
            seconds=seconds,
            live=False if plain else None,
            on_ready=lambda keys: click.echo(
                f"brama-mq: watching {' '.join(keys)} on {settings.safe_broker_url}"
                f" (prefix {settings.prefix})", err=True,
            ),
        )
    except FilterError as exc:
        _fail(str(exc), EXIT_USAGE)
    except NoTopologyError as exc:
        _fail(str(exc), EXIT_NO_OWNER)
    except BramaError as exc:
        _fail(f"{exc} (broker {settings.safe_broker_url})")
    finally:
        with contextlib.suppress(BramaError):
            transport.close()


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (click's completion).

    \b
    Examples:
      eval "$(brama-mq completion bash)"                    # in ~/.bashrc
      eval "$(brama-mq completion zsh)"                     # in ~/.zshrc
      brama-mq completion fish > ~/.config/fish/completions/brama-mq.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above allows only shells click knows
    click.echo(cls(main, {}, "brama-mq", "_BRAMA_MQ_COMPLETE").source())


def _add_admin_commands() -> None:
    from brama_mq.cli.admin import ADMIN_COMMANDS

    for command in ADMIN_COMMANDS:
        main.add_command(command)


_add_admin_commands()


def _add_dashboard_command() -> None:
    from brama_mq.cli.dashboard import dashboard

    main.add_command(dashboard)


_add_dashboard_command()
