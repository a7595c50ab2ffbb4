"""``brama-mq dashboard``: serve the live web page of :mod:`brama_mq.dashboard`.

Reads go through a transport that declares nothing (a mistyped prefix is reported, not
created), like ``status`` and ``watch``. Admin actions (open, close, reset) are off
unless ``--admin`` is given; then every one needs the token as a bearer header.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import sys
from typing import Any

import click
from click.core import ParameterSource

from brama_mq.cli.options import shards_option, tls_options
from brama_mq.errors import BramaError
from brama_mq.settings import MEMORY_URL, Settings, SettingsError

__all__ = ["MIN_TOKEN_LENGTH", "dashboard"]

EXIT_FAILED = 1
EXIT_USAGE = 2
#: Shorter admin tokens are refused: a guessable token is no protection.
MIN_TOKEN_LENGTH = 16
#: Bars of each failure chart (the window is split into this many buckets).
CHART_BARS = 30


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"brama-mq: {message}", err=True)
    sys.exit(code)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, as the host says)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


@click.command()
@click.option("--broker", "broker_url", default=None, help="Broker URL [env BRAMA_BROKER_URL].")
@click.option("--prefix", default=None, help="Name prefix [env BRAMA_PREFIX].")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="BRAMA_DASHBOARD_HOST",
              help="Address to listen on (0.0.0.0: every interface) [env BRAMA_DASHBOARD_HOST].")
@click.option("--port", type=click.IntRange(0, 65535), default=8088, show_default=True,
              envvar="BRAMA_DASHBOARD_PORT",
              help="Port to listen on (0: any free one) [env BRAMA_DASHBOARD_PORT].")
@click.option("--admin", is_flag=True, envvar="BRAMA_DASHBOARD_ADMIN",
              help="Allow open/close/reset from the page (with a token) "
              "[env BRAMA_DASHBOARD_ADMIN; default off].")
@click.option("--admin-token", default=None, envvar="BRAMA_DASHBOARD_TOKEN", metavar="TOKEN",
              help="The bearer token admin actions need (with --admin; default: a fresh one, "
              f"printed once; at least {MIN_TOKEN_LENGTH} characters) "
              "[env BRAMA_DASHBOARD_TOKEN].")
@click.option("--timeout", default=5.0, show_default=True,
              help="Seconds to wait for the owner's answers (snapshot, admin actions).")
@click.option("--chart-window", type=click.IntRange(30, 24 * 3600), default=300,
              show_default=True, metavar="SECONDS",
              help=f"What the failure charts span, in {CHART_BARS} bars.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="The web server's log level.")
@shards_option
@tls_options
@click.pass_context
def dashboard(
    ctx: click.Context,
    broker_url: str | None,
    prefix: str | None,
    host: str,
    port: int,
    admin: bool,
    admin_token: str | None,
    timeout: float,
    chart_window: int,
    log_level: str,
) -> None:
    """Serve a live web page of every breaker: state, failures, rate, time left open,
    mode, grouped by scope, with a filter, the event feed and failures per connection.

    The page follows a transient subscription (it costs the owner nothing while nobody
    looks) and is served on 127.0.0.1 unless --host says otherwise. Ctrl-C (or SIGTERM)
    stops it.

    \b
    Examples:
      brama-mq dashboard                              # http://127.0.0.1:8088/
      brama-mq dashboard --prefix brama --port 9000
      brama-mq dashboard --host 0.0.0.0 --admin       # prints a fresh admin token
      BRAMA_DASHBOARD_TOKEN=... brama-mq dashboard --admin
    """
    try:
        settings = Settings.from_env(broker_url=broker_url, prefix=prefix)
    except SettingsError as exc:
        _fail(str(exc), EXIT_USAGE)
    if settings.broker_url.startswith(MEMORY_URL):
        _fail("the dashboard needs a broker: the embedded transport lives inside one process",
              EXIT_USAGE)
    given = ctx.get_parameter_source("admin_token") == ParameterSource.COMMANDLINE
    if admin_token is not None and given and not admin:
        _fail("--admin-token needs --admin (admin actions are off without it)", EXIT_USAGE)
    generated = False
    if admin and not admin_token:
        admin_token, generated = secrets.token_urlsafe(24), True
    if admin and admin_token is not None and len(admin_token) < MIN_TOKEN_LENGTH:
        _fail(f"the admin token must have at least {MIN_TOKEN_LENGTH} characters", EXIT_USAGE)
    try:
        from brama_mq.dashboard import Board, Dashboard
    except ImportError as exc:
        if exc.name not in ("starlette", "uvicorn", "anyio", "h11"):
            raise
        _fail(f"the dashboard needs {exc.name}: pip install 'brama-mq[dashboard]'", EXIT_USAGE)
    try:
        sock = _bind(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} (pick another --port)",
              EXIT_USAGE)

    from brama_mq.cli.admin import EXIT_NO_OWNER, read_only_transport
    from brama_mq.errors import NoTopologyError

    def _interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn takes SIGINT/SIGTERM while it serves and raises them again when done:
    # both end up here as KeyboardInterrupt, and the command exits 0.
    signal.signal(signal.SIGTERM, _interrupt)
    transport = None
    board = None
    try:
        transport = read_only_transport(settings)
        board = Dashboard(
            transport, admin_token=admin_token if admin else None, request_timeout=timeout,
            title=f"prefix {settings.prefix} on {settings.safe_broker_url}",
            board=Board(bucket_ms=chart_window * 1000 // CHART_BARS, buckets=CHART_BARS),
        ).open()
        url = _url(host, sock)
        click.echo(f"brama-mq: dashboard on {url} (broker {settings.safe_broker_url}, "
                   f"prefix {settings.prefix})", err=True)
        if board.note:
            click.echo(f"brama-mq: {board.note}", err=True)
        if admin and generated:
            click.echo(f"brama-mq: admin actions on; token {admin_token} (generated: send it as "
                       f"'Authorization: Bearer <token>', or open {url}#token={admin_token})",
                       err=True)
        elif admin:
            click.echo("brama-mq: admin actions on (token from --admin-token / "
                       "BRAMA_DASHBOARD_TOKEN)", err=True)
        board.serve(sock, log_level=log_level)
    except KeyboardInterrupt:
        pass
    except NoTopologyError as exc:
        _fail(str(exc), EXIT_NO_OWNER)
    except BramaError as exc:
        _fail(f"{exc} (broker {settings.safe_broker_url})")
    finally:
        if board is not None:
            board.close()
        if transport is not None:
            with contextlib.suppress(BramaError):
                transport.close()
        with contextlib.suppress(OSError):
            sock.close()
