"""``brama-mq demo``: the whole system in one process, watched live.

A real owner, a client reporting calls to a simulated flaky ``payment_api`` and a healthy
``ledger_db``, and a subscriber bound with ``#`` that prints every event. It runs on the
embedded transport by default (no broker) and on RabbitMQ with ``--broker amqp://...``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from brama_mq.client.brama import Brama
from brama_mq.core.events import CLOSED, HALF_OPEN, OPEN
from brama_mq.errors import BramaError, breaker_name
from brama_mq.owner.service import run_owner
from brama_mq.protocol import Event, decode_event
from brama_mq.settings import MEMORY_URL
from brama_mq.transport import Topology, Transport, open_transport

_STATE_STYLE = {CLOSED: "green", OPEN: "bold red", HALF_OPEN: "yellow"}
#: Event lines the live view keeps under the table.
_LIVE_LINES = 8


@dataclass
class DemoReport:
    """What the demo saw; returned so tests can check the story it told."""

    events: Counter[str] = field(default_factory=Counter)
    transitions: list[tuple[str, str, str]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    states: dict[str, str] = field(default_factory=dict)


class FlakyService:
    """Fails with a probability that drops to zero after ``heal_after`` seconds."""

    def __init__(self, failure_rate: float, heal_after: float, rng: random.Random) -> None:
        self.failure_rate = failure_rate
        self.heal_at = time.monotonic() + heal_after
        self.rng = rng

    def call(self) -> bool:
        if time.monotonic() >= self.heal_at:
            return True
        return self.rng.random() >= self.failure_rate


def run_demo(
    *,
    broker_url: str = MEMORY_URL,
    prefix: str | None = None,
    seconds: float = 8.0,
    seed: int | None = 7,
    console: Console | None = None,
    live: bool | None = None,
) -> DemoReport:
    console = console or Console()
    prefix = prefix or f"demo{uuid.uuid4().hex[:8]}"
    transport = open_transport(broker_url, Topology(prefix))
    report = DemoReport()
    try:
        _run(transport, report, seconds, random.Random(seed), console, live)
    except BaseException:
        # The run's own error (the broker is down, the password is wrong) is the one to
        # show: a clean-up that fails for the same reason must not replace it.
        with contextlib.suppress(BramaError):
            _clean_up(transport, broker_url)
        raise
    _clean_up(transport, broker_url)
    return report


def _clean_up(transport: Transport, broker_url: str) -> None:
    try:
        if not broker_url.startswith(MEMORY_URL):
            transport.delete_topology()
    finally:
        transport.close()


def _run(
    transport: Transport,
    report: DemoReport,
    seconds: float,
    rng: random.Random,
    console: Console,
    live: bool | None,
) -> None:
    transport.declare()
    owner = run_owner(transport)
    source = transport.event_source()
    source.bind(["#"])
    stop = threading.Event()
    lock = threading.Lock()
    lines: list[str] = []

    def listen() -> None:
        while not stop.is_set():
            deliveries = source.get(0.1)
            for d in deliveries:
                event = decode_event(d.body, d.content_type)
                with lock:
                    _note(report, event, lines)
            if deliveries:
                source.ack(deliveries[-1].delivery_tag, multiple=True)

    listener = threading.Thread(target=listen, name="demo-subscriber", daemon=True)
    listener.start()
    client = Brama(transport=transport)
    services = {
        "payment_api": FlakyService(0.7, seconds * 0.45, rng),
        "ledger_db": FlakyService(0.0, 0.0, rng),
    }
    client.register("payment_api", scope="payments", max_attempts=3, expiry_ms=1200, wait=True)
    client.register("ledger_db", scope="payments", max_attempts=3, expiry_ms=1200, wait=True)
    live = console.is_terminal if live is None else live
    deadline = time.monotonic() + seconds
    try:
        if live:
            # The table on top, the last events below it; the final frame stays on screen,
            # so nothing is printed again afterwards.
            with Live(_view(report, lines), console=console, refresh_per_second=8) as view:
                while time.monotonic() < deadline:
                    _tick(client, services, report, lock)
                    with lock:
                        del lines[:-_LIVE_LINES]
                        view.update(_view(report, lines))
                    time.sleep(0.1)
                time.sleep(0.3)  # let the last events arrive
                with lock:
                    view.update(_view(report, lines[-_LIVE_LINES:]))
                    lines.clear()
        else:
            while time.monotonic() < deadline:
                _tick(client, services, report, lock)
                with lock:
                    for line in lines:
                        console.print(line, highlight=False, soft_wrap=True)
                    lines.clear()
                time.sleep(0.1)
            time.sleep(0.3)  # let the last events arrive
    finally:
        stop.set()
        listener.join(5)
        owner.stop(wait=10)
        source.close()
        client.disconnect()
    with lock:
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
    # soft_wrap: one line per record however narrow the terminal (or pipe) is
    console.print(f"[bold]events seen:[/] {dict(sorted(report.events.items()))}", soft_wrap=True)
    console.print(f"[bold]calls:[/] {dict(sorted(report.calls.items()))}", soft_wrap=True)
    console.print(f"[bold]final states:[/] {report.states}", soft_wrap=True)


def _tick(
    client: Brama, services: dict[str, FlakyService], report: DemoReport, lock: threading.Lock
) -> None:
    for name, service in services.items():
        with lock:
            state = report.states.get(name, CLOSED)
        lease = None
        if state == OPEN:
            with lock:
                report.calls[f"{name}:refused"] += 1
            continue
        if state == HALF_OPEN:
            probe = client.acquire_probe(name, scope="payments")
            if not probe["granted"]:
                with lock:
                    report.calls[f"{name}:refused"] += 1
                continue
            lease = probe["lease"]
        ok = service.call()
        with lock:
            report.calls[f"{name}:{'ok' if ok else 'failed'}"] += 1
        if ok:
            client.success(name, scope="payments", lease=lease)
        else:
            client.failure(name, scope="payments", reason="simulated timeout", lease=lease)


def _note(report: DemoReport, event: Event, lines: list[str]) -> None:
    report.events[event.event] += 1
    state = event.data.get("state")
    if isinstance(state, str):
        report.states[event.connection] = state
    if event.event == "state_change":
        report.transitions.append(
            (event.connection, str(event.previous_state), str(event.new_state))
        )
    if event.event not in ("success",):
        lines.append(_line(event))


def _line(event: Event) -> str:
    data: dict[str, Any] = dict(event.data)
    extra = ""
    if event.event == "state_change":
        extra = f" {data.get('previous_state')} -> {data.get('new_state')} ({data.get('reason')})"
    elif event.event == "failure":
        extra = f" count={data.get('failure_count')} reason={data.get('reason')}"
    style = _STATE_STYLE.get(str(data.get("state")), "white")
    name = breaker_name(event.scope, event.connection)
    return f"[{style}]{event.event:<24}[/] {name} #{event.seq}{extra}"


def _view(report: DemoReport, lines: list[str]) -> Group:
    """The live frame: the states table, then the latest event lines under it."""
    return Group(_table(report), *(Text.from_markup(line) for line in lines[-_LIVE_LINES:]))


def _table(report: DemoReport) -> Table:
    table = Table(title="brama_mq demo: circuit states (events below)", expand=False)
    table.add_column("connection")
    table.add_column("state")
    table.add_column("calls ok / failed / refused")
    for name in ("payment_api", "ledger_db"):
        state = report.states.get(name, "-")
        calls = report.calls
        table.add_row(
            name,
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            f"{calls[name + ':ok']} / {calls[name + ':failed']} / {calls[name + ':refused']}",
        )
    return table
