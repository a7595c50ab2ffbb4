"""`brama-mq status/register/open/close/reset/configure/unregister` as real processes
against a running owner: output, --json, and exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Transport

pytestmark = pytest.mark.broker


@pytest.fixture
def owner(amqp_transport: Transport) -> Iterator[Owner]:
    amqp_transport.declare()
    running = run_owner(amqp_transport)
    yield running
    running.stop(wait=10)


def cli(broker_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "brama_mq.cli", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


def test_admin_commands_steer_a_breaker(owner: Owner, broker_url: str, prefix: str) -> None:
    """register -> open --until-closed -> status shows it open -> close -> reset -> unregister."""
    r = cli(broker_url, prefix, "register", "payment_api", "--scope", "payments",
            "-o", "max_attempts=3", "-o", "expiry_ms=30000", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "applied"
    r = cli(broker_url, prefix, "open", "payment_api", "--scope", "payments", "--until-closed",
            "--reason", "maintenance")
    assert r.returncode == 0, r.stderr
    assert "circuit_opened" in r.stdout and "state_change" in r.stdout
    r = cli(broker_url, prefix, "status", "--scope", "payments", "--json")
    rows = json.loads(r.stdout)
    assert [(x["connection"], x["state"], x["open_until"]) for x in rows] == [
        ("payment_api", "open", None)
    ]
    r = cli(broker_url, prefix, "status")
    assert r.returncode == 0 and "payment_api" in r.stdout and "until closed" in r.stdout
    r = cli(broker_url, prefix, "configure", "payment_api", "--scope", "payments",
            "-o", "expiry_ms=1000", "--json")
    assert r.returncode == 0, r.stderr
    r = cli(broker_url, prefix, "close", "payment_api", "--scope", "payments")
    assert r.returncode == 0 and "circuit_closed" in r.stdout
    r = cli(broker_url, prefix, "reset", "payment_api", "--scope", "payments", "--json")
    assert [e["event"] for e in json.loads(r.stdout)["events"]] == ["circuit_reset"]
    r = cli(broker_url, prefix, "unregister", "payment_api", "--scope", "payments")
    assert r.returncode == 0 and "connection_removed" in r.stdout


def test_exit_codes(owner: Owner, broker_url: str, prefix: str) -> None:
    """Not registered -> 3 (answered, not dead-lettered), bad option -> 2, bad name -> 2;
    each a one-line error on stderr."""
    r = cli(broker_url, prefix, "close", "ghost")
    assert r.returncode == 3
    assert len(r.stderr.strip().splitlines()) == 1 and "not registered" in r.stderr
    # The caller was told why: the refusal is not also a dead letter.
    assert owner.stats.refused == 1 and owner.stats.dead_lettered == 0, owner.stats
    r = cli(broker_url, prefix, "register", "x", "-o", "max_attempts=0")
    assert r.returncode == 2 and "max_attempts" in r.stderr
    r = cli(broker_url, prefix, "register", "x", "-o", "nonsense=1")
    assert r.returncode == 2 and "unknown option" in r.stderr
    r = cli(broker_url, prefix, "register", "a\x07b")
    assert r.returncode == 2 and "control character" in r.stderr


def test_no_owner_is_exit_code_4(broker_url: str, prefix: str, amqp_transport: Transport) -> None:
    """With nobody consuming the owner queue, a command times out with exit code 4."""
    amqp_transport.declare()
    r = cli(broker_url, prefix, "status", "--timeout", "1")
    assert r.returncode == 4 and "brama-mq worker" in r.stderr


def test_broker_away_is_exit_code_1(prefix: str) -> None:
    """An unreachable broker fails with code 1 and never shows the password."""
    r = cli("amqp://guest:hunter2secret@127.0.0.1:1//", prefix, "status", "--timeout", "1")
    assert r.returncode == 1
    assert "hunter2secret" not in r.stderr + r.stdout
