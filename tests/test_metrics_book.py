"""The owner metrics' book: per-breaker call counts by Resilience4j's kinds and the
window rates, followed from events (table-driven; no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from brama_mq.core.events import Event
from brama_mq.metrics.book import CircuitBook


def _event(kind: str, connection: str = "api", scope: str | None = "pay",
           **data: Any) -> Event:
    return Event(kind, 0, connection, scope, "id", 1, {"state": "closed", **data}, 1)


CASES = [
    ("one success", [_event("success")], [("pay", "api", "successful", 1)], []),
    ("a batched success counts its calls", [_event("success", count=5)],
     [("pay", "api", "successful", 5)], []),
    ("failures", [_event("failure"), _event("failure")], [("pay", "api", "failed", 2)], []),
    ("a slow failure is failed and slow", [_event("failure", slow=True)],
     [("pay", "api", "failed", 1), ("pay", "api", "slow", 1)], []),
    ("unscoped breakers have scope ''", [_event("success", scope=None)],
     [("", "api", "successful", 1)], []),
    ("rates follow the latest outcome",
     [_event("failure", failure_rate=100.0, slow_call_rate=0.0),
      _event("success", failure_rate=50.0, slow_call_rate=0.0)],
     [("pay", "api", "failed", 1), ("pay", "api", "successful", 1)],
     [("pay", "api", "failure_rate", 50.0), ("pay", "api", "slow_call_rate", 0.0)]),
    ("other events count no calls", [_event("circuit_opened"), _event("registration")], [], []),
    ("a removed breaker's series go",
     [_event("failure", failure_rate=100.0), _event("connection_removed")], [], []),
]


@pytest.mark.parametrize(("events", "calls", "rates"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_calls_and_rates_follow_the_events(events: list[Event], calls: list[Any],
                                           rates: list[Any]) -> None:
    """What brama_circuitbreaker_calls_total and the rate gauges show after these events."""
    book = CircuitBook()
    for event in events:
        book.apply(event)
    assert book.call_counts() == sorted(calls)
    assert book.rate_rows() == sorted(rates)


def test_seed_takes_rates_from_status_rows() -> None:
    """A status row's rates (window strategies) seed the gauges at start and takeover."""
    book = CircuitBook()
    book.seed([{"scope": None, "connection": "db", "state": "closed", "failure_count": 1,
                "failure_rate": 25.0, "slow_call_rate": None}])
    assert book.rate_rows() == [("", "db", "failure_rate", 25.0)]


MODE_CASES = [
    ("a breaker starts in normal mode", [], "normal"),
    ("a mode change sets it", [_event("state_change", mode="forced_open", reason="mode")],
     "forced_open"),
    ("events of a breaker in a mode keep it",
     [_event("state_change", mode="disabled"), _event("failure", mode="disabled")], "disabled"),
    ("back to normal", [_event("state_change", mode="metrics_only"),
                        _event("state_change", mode="normal", previous_mode="metrics_only")],
     "normal"),
]


@pytest.mark.parametrize(("events", "mode"), [c[1:] for c in MODE_CASES],
                         ids=[c[0] for c in MODE_CASES])
def test_mode_follows_the_events(events: list[Event], mode: str) -> None:
    """What brama_circuit_mode shows as the current mode after these events."""
    book = CircuitBook()
    book.seed([{"scope": "pay", "connection": "api", "state": "closed", "failure_count": 0}])
    for event in events:
        book.apply(event)
    assert book.mode_of("pay", "api") == mode


def test_prometheus_exports_the_mode_gauge() -> None:
    """brama_circuit_mode{scope,connection,mode} is 1 for the current mode only."""
    from prometheus_client import generate_latest

    from brama_mq.metrics.prometheus import OwnerMetrics

    metrics = OwnerMetrics()
    metrics.book.seed([{"scope": None, "connection": "db", "state": "open",
                        "failure_count": 0, "mode": "forced_open"}])
    text = generate_latest(metrics.registry).decode()
    assert 'brama_circuit_mode{connection="db",mode="forced_open",scope=""} 1.0' in text
    assert 'brama_circuit_mode{connection="db",mode="normal",scope=""} 0.0' in text
