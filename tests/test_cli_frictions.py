"""What a newcomer trips over first, pinned: read-only commands leave no trace on a
mistyped prefix and say when no owner answers, a non-AMQP URL is a one-line error, the
demo shows the connect error (not a clean-up failure), one way to write a breaker, a
password and a count, and --help that names every option's meaning."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from urllib.parse import urlsplit

import amqp
import pytest
from click.testing import CliRunner
from rich.console import Console

from brama_mq.cli import main
from brama_mq.cli.demo import DemoReport, _view
from brama_mq.errors import breaker_name, plural
from brama_mq.settings import Settings, SettingsError, check_broker_url, mask_url
from brama_mq.transport import open_transport


def cli(broker_url: str, prefix: str, *args: str, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "brama_mq.cli", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _existing(broker_url: str, prefix: str) -> list[str]:
    """Which of the topology's exchanges and queues exist (passive declares)."""
    url = urlsplit(broker_url)
    found = []
    conn = amqp.Connection(f"{url.hostname}:{url.port or 5672}", userid=url.username or "guest",
                           password=url.password or "guest")
    conn.connect()
    try:
        for kind, name in [("exchange", f"{prefix}.commands"), ("exchange", f"{prefix}.events"),
                           ("exchange", f"{prefix}.dead"), ("queue", f"{prefix}.owner"),
                           ("queue", f"{prefix}.dead"), ("queue", f"{prefix}.journal")]:
            ch = conn.channel()
            try:
                if kind == "exchange":
                    ch.exchange_declare(name, "topic", passive=True)
                else:
                    ch.queue_declare(name, passive=True)
                found.append(name)
                ch.close()
            except amqp.exceptions.NotFound:
                pass
    finally:
        conn.close()
    return found


@pytest.mark.broker
@pytest.mark.parametrize("command", [["status", "--timeout", "2"], ["watch", "--seconds", "2"]])
def test_read_only_commands_on_a_mistyped_prefix_declare_nothing(
    broker_url: str, prefix: str, command: list[str]
) -> None:
    """status and watch on a prefix no worker ever used exit 4 with one line naming the
    prefix, and leave no exchange or queue behind."""
    typo = f"{prefix}typo"
    r = cli(broker_url, typo, *command)
    assert r.returncode == 4, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and typo in lines[0] and "no brama_mq topology" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert _existing(broker_url, typo) == []


@pytest.mark.broker
def test_watch_says_when_no_owner_answers(broker_url: str, prefix: str, amqp_transport: object
                                          ) -> None:
    """watch on a prefix with a topology but no worker says no owner answered, instead of
    exiting silently."""
    amqp_transport.declare()  # type: ignore[attr-defined]
    r = cli(broker_url, prefix, "watch", "--seconds", "3", "--plain")
    assert r.returncode == 0, r.stderr
    assert "no owner answered" in r.stdout + r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "http://x", "127.0.0.1:5672",
                                 "amqp://h//;redis://h"])
def test_a_non_amqp_url_is_refused_naming_it(url: str) -> None:
    """A URL brama_mq cannot speak to fails before connecting, naming the URL (password
    masked) and what is accepted; Settings, open_transport and the CLI agree."""
    with pytest.raises(SettingsError, match="is not an AMQP URL"):
        check_broker_url(url)
    with pytest.raises(SettingsError, match="is not an AMQP URL"):
        Settings(broker_url=url)
    with pytest.raises(SettingsError, match="is not an AMQP URL"):
        open_transport(url)
    r = subprocess.run([sys.executable, "-m", "brama_mq.cli", "status", "--broker", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not an AMQP URL" in r.stderr
    assert "Traceback" not in r.stderr


def test_accepted_urls_pass_the_check() -> None:
    """AMQP URLs (failover lists too) and the embedded transport pass."""
    for url in ("amqp://guest:guest@127.0.0.1:5672//", "amqps://h:5671/v",
                "pyamqp://h//", "amqp://a//;amqp://b//", "memory://"):
        check_broker_url(url)


@pytest.mark.broker
def test_demo_with_bad_credentials_shows_the_connect_error(broker_url: str) -> None:
    """A wrong password ends the demo with the broker's refusal, not with a failed
    clean-up that hides it."""
    url = urlsplit(broker_url)
    bad = f"amqp://{url.username or 'guest'}:wrong-password@{url.hostname}:{url.port or 5672}//"
    r = subprocess.run([sys.executable, "-m", "brama_mq.cli", "demo", "--broker", bad,
                        "--seconds", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "ACCESS_REFUSED" in r.stderr or "refused" in r.stderr.lower(), r.stderr
    assert "delete topology" not in r.stderr, r.stderr
    assert "wrong-password" not in r.stderr + r.stdout


def test_demo_live_frame_puts_events_below_the_table() -> None:
    """The live frame is the table, then the event lines under it (the title says
    "events below"), never event text inside a table cell."""
    report = DemoReport()
    report.states["payment_api"] = "open"
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    console.print(_view(report, ["circuit_opened           payments/payment_api #6"]))
    lines = out.getvalue().splitlines()
    bottom = max(i for i, ln in enumerate(lines) if ln.lstrip().startswith("└"))
    event_rows = [i for i, ln in enumerate(lines) if "circuit_opened" in ln]
    assert event_rows and all(i > bottom for i in event_rows), out.getvalue()
    assert not any("│" in lines[i] for i in event_rows)


def test_one_way_to_write_a_breaker_a_password_and_a_count() -> None:
    """scope/connection everywhere, passwords as ``**``, and "1 breaker" / "2 breakers"."""
    assert breaker_name("payments", "payment_api") == "payments/payment_api"
    assert breaker_name(None, "payment_api") == "payment_api"
    assert mask_url("amqp://u:secret@h//;amqp://u:other@k//") == "amqp://u:**@h//;amqp://u:**@k//"
    assert "secret" not in repr(Settings(broker_url="amqp://u:secret@h//"))
    assert "u:**@h" in repr(Settings(broker_url="amqp://u:secret@h//"))
    assert (plural(1, "breaker"), plural(2, "breaker"), plural(0, "breaker")) == (
        "1 breaker", "2 breakers", "0 breakers")


@pytest.mark.parametrize("command", ["status", "register", "configure", "open", "close",
                                     "reset", "unregister", "mode", "worker", "watch", "demo"])
def test_help_explains_every_option_and_types_numbers(command: str) -> None:
    """Every option has help text, and options that take seconds or counts do not show
    as TEXT in --help."""
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    cmd = main.commands[command]
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.param_type_name != "option":
            continue
        assert getattr(param, "help", None), f"{command} {param.opts} has no help"
    for line in result.output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].startswith("--") and words[1] == "TEXT":
            assert not any(w in words[0] for w in ("timeout", "interval", "seconds", "port",
                                                    "count", "shard", "prefetch")), line
