"""The command line of issue 15: ``brama-mq mode``, the mode and rate columns of
``status``, and what ``watch`` says about rate openings and changes of mode. Commands run
as real processes against a real owner on the test broker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from brama_mq.cli import main
from brama_mq.cli.watch import WatchView, _detail, _line, run_watch
from brama_mq.client import Brama
from brama_mq.owner import Owner, run_owner
from brama_mq.protocol import Event
from brama_mq.transport.amqp import AmqpTransport
from tests.worker_proc import ROOT

pytestmark = pytest.mark.broker

MODES = ["normal", "disabled", "forced_open", "metrics_only"]


@pytest.fixture
def owner(amqp_transport: AmqpTransport) -> Iterator[Owner]:
    amqp_transport.declare()
    running = run_owner(amqp_transport)
    yield running
    running.stop(wait=10)


def cli(broker_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix,
           "COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "brama_mq.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60, cwd=ROOT)


def test_mode_sets_the_mode_and_says_what_changed(
    owner: Owner, broker_url: str, prefix: str
) -> None:
    """``mode CONNECTION MODE`` applies configure's option mode (waiting for the owner)
    and prints both modes and states; the same mode again changes nothing; --json prints
    the applied events; status shows a mode column and --json rows carry it; an unknown
    mode exits 2 listing the valid ones, an unknown connection 3."""
    assert cli(broker_url, prefix, "register", "payment_api", "--scope", "payments"
               ).returncode == 0
    r = cli(broker_url, prefix, "mode", "payment_api", "forced_open", "--scope", "payments")
    assert r.returncode == 0, r.stderr
    assert "payments/payment_api mode normal -> forced_open, state closed -> open" in r.stdout
    assert "circuit_opened" in r.stdout and "state_change" in r.stdout
    r = cli(broker_url, prefix, "mode", "payment_api", "forced_open", "--scope", "payments")
    assert r.returncode == 0 and "already forced_open (no events)" in r.stdout, r.stdout
    rows = json.loads(cli(broker_url, prefix, "status", "--json").stdout)
    assert [(x["connection"], x["state"], x["mode"]) for x in rows] == [
        ("payment_api", "open", "forced_open")]
    table = cli(broker_url, prefix, "status").stdout
    header = next(line for line in table.splitlines() if "connection" in line)
    assert "mode" in header and "failure rate" not in header  # no window: no rate column
    assert "time left open" in header
    row = next(line for line in table.splitlines() if "payment_api" in line)
    assert "forced_open" in row and "until closed" in row
    r = cli(broker_url, prefix, "mode", "payment_api", "metrics_only", "--scope", "payments",
            "--json")
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stdout)
    change = next(e for e in applied["events"] if e["event"] == "state_change")
    assert change["data"]["reason"] == "mode" and change["data"]["mode"] == "metrics_only"
    assert change["data"]["previous_mode"] == "forced_open"

    r = cli(broker_url, prefix, "mode", "payment_api", "paused", "--scope", "payments")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "paused" in r.stderr
    assert all(m in r.stderr for m in MODES), r.stderr
    r = cli(broker_url, prefix, "mode", "ghost", "disabled")
    assert r.returncode == 3 and "not registered" in r.stderr, r.stderr


def test_status_shows_the_failure_rate_when_present(
    owner: Owner, broker_url: str, prefix: str, amqp_transport: AmqpTransport
) -> None:
    """Connections with a window show their failure rate (and slow-call rate when calls
    are timed) in a ``failure rate`` column; others show ``-`` there. With every mode
    normal there is no mode column (the --json rows carry the mode all the same)."""
    client = Brama(transport=amqp_transport)
    try:
        client.register("rated", scope="s", wait=True, strategy="failure_rate",
                        window_size=10, slow_call_ms=100)
        client.register("plain", scope="s", wait=True)
        client.success("rated", scope="s", duration_ms=250, wait=True)
        client.failure("rated", scope="s", wait=True)
        client.success("rated", scope="s", wait=True)
        client.success("rated", scope="s", wait=True)
    finally:
        client.disconnect()
    table = cli(broker_url, prefix, "status").stdout
    header = next(line for line in table.splitlines() if "connection" in line)
    assert "failure rate" in header and "mode" not in header, table
    rated = next(line for line in table.splitlines() if "rated" in line)
    assert "25.0%, slow 25.0%" in rated and "normal" not in rated, table
    assert " 1 " in rated and "1/5" not in rated  # a window's count, not of max_attempts
    plain = next(line for line in table.splitlines() if "plain" in line)
    assert " - " in plain
    rows = {r["connection"]: r for r in json.loads(cli(broker_url, prefix, "status", "--json"
                                                       ).stdout)}
    assert rows["rated"]["failure_rate"] == 25.0 and rows["plain"]["failure_rate"] is None
    assert rows["rated"]["mode"] == rows["plain"]["mode"] == "normal"


def test_mode_is_in_help_and_completes() -> None:
    """``mode`` lists the modes in its help, with examples; MODE completes to them."""
    out = CliRunner().invoke(main, ["mode", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "brama-mq mode payment_api forced_open" in out.output
    assert all(m in out.output for m in MODES)
    env = {**os.environ, "_BRAMA_MQ_COMPLETE": "bash_complete",
           "COMP_WORDS": "brama-mq mode payment_api ", "COMP_CWORD": "3"}
    done = subprocess.run(
        [sys.executable, "-c", "from brama_mq.cli import main; main(prog_name='brama-mq')"],
        env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    words = [line.split(",", 1)[1] for line in done.stdout.splitlines() if "," in line]
    assert words == MODES, done


def _event(kind: str, data: dict[str, Any], seq: int = 1) -> Event:
    return Event.model_validate({"event": kind, "timestamp": 1_630_000_000_000,
                                 "connection": "payment_api", "scope": "payments",
                                 "id": f"e{seq}", "seq": seq, "data": data})


def test_watch_lines_say_the_rate_sentence_and_the_modes() -> None:
    """A rate opening shows its reason word and ``data.detail``; a change of mode shows
    both modes; a slow outcome is marked; the state column shows a mode not normal."""
    opened = _event("state_change", {
        "state": "open", "failure_count": 3, "previous_state": "closed", "new_state": "open",
        "reason": "failure_rate", "detail": "Failure rate 60.0% >= 50%"})
    assert _detail(opened) == "closed -> open (failure_rate: Failure rate 60.0% >= 50%)"
    moved = _event("state_change", {
        "state": "closed", "failure_count": 0, "mode": "disabled", "previous_state": "closed",
        "new_state": "closed", "reason": "mode", "previous_mode": "normal"}, 2)
    assert _detail(moved) == "closed -> closed (mode normal -> disabled)"
    assert "payments/payment_api seq=2  closed -> closed (mode normal -> disabled)" in _line(
        moved)
    slow = _event("failure", {"state": "closed", "failure_count": 1, "reason": "timeout",
                              "slow": True}, 3)
    assert _detail(slow) == "timeout [slow]"
    plain = _event("state_change", {"state": "open", "previous_state": "closed",
                                    "new_state": "open", "reason": "Threshold exceeded"})
    assert _detail(plain) == "closed -> open (Threshold exceeded)"
    view = WatchView(["#"])
    view.note(moved)
    (row,) = view.rows.values()
    assert row.shown_state == "closed (disabled)"
    view.seed([{"scope": "payments", "connection": "payment_api", "state": "open",
                "mode": "forced_open", "failure_count": 0}])
    (row,) = view.rows.values()
    assert row.shown_state == "open (forced_open)"


def test_watch_shows_a_rate_opening_and_a_mode_change_live(
    owner: Owner, amqp_transport: AmqpTransport
) -> None:
    """``watch --plain`` against a real owner prints the failure-rate opening with its
    sentence and the change of mode with both modes."""
    client = Brama(transport=amqp_transport)
    out = io.StringIO()
    ready = threading.Event()
    shown: list[int] = []

    def watch() -> None:
        shown.append(run_watch(transport=amqp_transport, events=["state_change"], count=2,
                               seconds=20, live=False, on_ready=lambda _: ready.set(),
                               console=Console(file=out, width=200)))

    try:
        client.register("payment_api", scope="payments", wait=True, strategy="failure_rate",
                        window_size=4, minimum_calls=2, failure_rate_threshold=50.0)
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        assert ready.wait(10)
        client.success("payment_api", scope="payments", wait=True)
        client.failure("payment_api", scope="payments", wait=True)
        client.configure("payment_api", scope="payments", mode="disabled", wait=True)
        thread.join(25)
        assert shown == [2], out.getvalue()
    finally:
        client.disconnect()
    text = out.getvalue()
    assert "closed -> open (failure_rate: Failure rate 50.0% >= 50%)" in text, text
    assert "open -> closed (mode normal -> disabled)" in text, text
