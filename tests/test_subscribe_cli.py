"""``brama-mq watch`` and ``workers/monitor.py`` against the real broker, as processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from brama_mq.cli.watch import WatchView
from brama_mq.protocol import Event
from brama_mq.transport.amqp import AmqpTransport
from tests.subscribe_helpers import Stack, owner_stack, wait_until

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stack(amqp_transport: AmqpTransport) -> Iterator[Stack]:
    with owner_stack(amqp_transport) as s:
        yield s


def _watch(url: str, prefix: str, *args: str, ready: bool = True) -> subprocess.Popen[str]:
    """Start ``brama-mq watch``; with ``ready``, return once it says it is bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "brama_mq.cli", "watch", "--broker", url, "--prefix", prefix,
         *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if ready:
        _await_line(proc, "brama-mq: watching ")
    return proc


def _await_line(proc: subprocess.Popen[str], start: str) -> str:
    """Read the process's stderr until a line containing ``start`` (AssertionError if it ends)."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        if start in line:
            return line
        seen.append(line)
    raise AssertionError(f"no {start!r} line; stderr: {''.join(seen)[-2000:]}")


def _open(stack: Stack, name: str, scope: str | None = "payments") -> None:
    stack.client.register(name, scope=scope, max_attempts=2, wait=True)
    stack.client.failure(name, scope=scope, wait=True)
    stack.client.failure(name, scope=scope, wait=True)


def test_watch_json_prints_the_filtered_events_one_per_line(
    stack: Stack, broker_url: str, prefix: str
) -> None:
    """watch --scope --events --json prints exactly the matching events, one JSON per line."""
    proc = _watch(broker_url, prefix, "--scope", "payments", "--events",
                  "failure,state_change", "--json", "--count", "3")
    _open(stack, "elsewhere", scope="other")
    _open(stack, "payment_api")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["connection"], e["event"], e["seq"]) for e in lines] == [
        ("payment_api", "failure", 3), ("payment_api", "failure", 4),
        ("payment_api", "state_change", 6),
    ]
    assert lines[-1]["data"]["new_state"] == "open"
    assert all(Event.model_validate(e) for e in lines)


def test_watch_pattern_and_plain_lines(stack: Stack, broker_url: str, prefix: str) -> None:
    """--pattern binds a raw topic key; --plain prints a line per event and the snapshot."""
    _open(stack, "known")  # in the owner's snapshot when watch starts
    proc = _watch(broker_url, prefix, "--pattern", "*.*.circuit_opened", "--plain",
                  "--count", "1")
    _open(stack, "payment_api")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "known open" in out  # the snapshot row
    assert "circuit_opened" in out and "payments/payment_api" in out and "-> open" in out


def test_watch_refuses_a_bad_event_name_listing_the_valid_ones(
    broker_url: str, prefix: str
) -> None:
    """A misspelt --events name exits 2 and lists the valid event names."""
    proc = _watch(broker_url, prefix, "--events", "state_chnage", ready=False)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "state_chnage" in err and "circuit_half_opened" in err


def test_watch_live_view_shows_states_and_latest_events() -> None:
    """The live view's tables hold each connection's state and the latest events."""
    view = WatchView(["#"])
    view.seed([{"scope": "payments", "connection": "ledger_db", "state": "closed",
                "failure_count": 0}])
    view.note(Event(event="state_change", timestamp=1_700_000_000_000, scope="payments",
                    connection="payment_api", id="x", seq=6,
                    data={"state": "open", "failure_count": 2, "previous_state": "closed",
                          "new_state": "open", "reason": "Threshold exceeded"}))
    console = Console(record=True, width=160, color_system=None)
    console.print(view.render(now_ms=1_700_000_002_000))
    text = console.export_text()
    assert "ledger_db" in text and "payment_api" in text
    assert "closed -> open (Threshold exceeded)" in text and "2.0s" in text
    assert "latest events (1 seen)" in text


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_monitor_worker_alerts_when_a_circuit_opens(
    stack: Stack, broker_url: str, prefix: str
) -> None:
    """workers/monitor.py logs an ALERT and POSTs the webhook when a circuit opens."""
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received = []
    proc = subprocess.Popen(
        [sys.executable, "workers/monitor.py", "--broker", broker_url, "--prefix", prefix,
         "--webhook", f"http://127.0.0.1:{server.server_port}/hook"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _await_line(proc, "monitor watching")
        stack.client.register("healthy", wait=True)
        stack.client.failure("healthy", wait=True)
        _open(stack, "payment_api")
        wait_until(lambda: len(_Hook.received) == 1, 15)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        err = rest
    finally:
        server.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    [hook] = _Hook.received
    assert hook["text"].startswith("Brama: circuit opened for payments/payment_api")
    assert hook["event"]["data"]["new_state"] == "open"
    assert "ALERT circuit opened for payments/payment_api: Threshold exceeded" in err
    assert "healthy" not in err.split("ALERT", 1)[1]
