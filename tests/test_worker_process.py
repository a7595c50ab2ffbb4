"""``brama-mq worker`` as a real process: commands in, events out, signals, settings, secrets.

The worker runs as a subprocess of this checkout (tests/worker_proc.py); commands come
from a real ``Brama`` client; what the worker published is watched with a plain kombu
queue (tests/wire.py), never with brama_mq's own subscriber code.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import amqp
import pytest

from brama_mq.client import Brama
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.wire import KombuTap
from tests.worker_proc import WorkerProcess, run_cli
from tests.worker_proc import start_worker as _start

pytestmark = pytest.mark.broker






def _depth(url: str, queue: str) -> int:
    probe = brokers.WireProbe(url, queue, declare=False)
    try:
        return probe.depth()
    finally:
        probe.close()


def _successes(tap: KombuTap) -> list[dict[str, object]]:
    return [s.body for s in tap.seen if s.event == "success"]


def _quiet(tap: KombuTap, pause: float = 0.5, limit: float = 20.0) -> None:
    """Drain until nothing new arrived for ``pause`` s."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        n = len(tap.seen)
        tap.drain(pause)
        if len(tap.seen) == n:
            return


def _in_parallel(calls: list[Callable[[], object]], threads: int = 8) -> None:
    """Run every call on a few threads (concurrent sends share their confirm round trips)."""
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def test_worker_applies_commands_and_drains_on_sigterm(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    """SIGTERM while 2,000 commands flow: the batch in hand is acked, exit 0, none lost."""
    topo = amqp_transport.topology
    amqp_transport.declare()
    tap = KombuTap(broker_url, topo.events_exchange, ["#"])
    client = Brama(transport=amqp_transport)
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    try:
        first = _start(workers, tmp_path, settings)
        names = [f"c{i}" for i in range(20)]
        for n in names:
            applied = client.register(n, scope="s", wait=True, max_attempts=5)
            assert applied is not None and applied.status == "applied"
        assert client.status("c7", scope="s")["state"] == "closed"
        tap.wait_for(lambda s: sum(x.event == "connection_registered" for x in s) == 20)

        total = 2000
        sent = 0

        def send_all() -> None:
            nonlocal sent
            targets = [names[i % len(names)] for i in range(total)]
            _in_parallel([lambda n=n: client.success(n, scope="s") for n in targets])
            sent = total

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        tap.wait_for(lambda s: len(_successes(tap)) >= 400, timeout=30)
        first.terminate()  # commands still flowing
        assert first.wait(20) == 0, first.output()
        sender.join(60)
        assert sent == total
        log = first.output()
        assert "signal 15: finishing the batch in hand" in log and "owner stopped" in log, log
        assert "Traceback" not in log, log

        # Nothing unacked, nothing lost: every command produced its event or is still ready.
        _quiet(tap)
        deadline = time.monotonic() + 10
        while True:
            applied_by_first = len(_successes(tap))
            ready = _depth(broker_url, topo.owner_queue())
            if applied_by_first + ready == total or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert applied_by_first + ready == total, (applied_by_first, ready)
        assert 400 <= applied_by_first < total

        # A second worker restores the registry the first left (its goodbye snapshot)
        # and applies the rest: nothing dead-lettered as "not registered".
        second = _start(workers, tmp_path, settings)
        assert "replica restored a snapshot of 20 connections" in second.output()
        tap.wait_for(lambda s: len(_successes(tap)) >= total, timeout=30)
        _quiet(tap)
        per_conn = Counter(str(b["connection"]) for b in _successes(tap))
        assert sum(per_conn.values()) == total, "a graceful stop duplicates nothing"
        assert per_conn == {n: total // len(names) for n in names}
        assert _depth(broker_url, topo.dead_queue) == 0
        second.terminate()
        assert second.wait(20) == 0
    finally:
        tap.close()
        client.disconnect()


# -- settings -------------------------------------------------------------------------


def test_flags_override_environment(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess], broker_registry: brokers.Registry,
) -> None:
    """--prefix and --prefetch win over BRAMA_PREFIX and BRAMA_PREFETCH (even a bad one)."""
    other = Topology(f"{prefix}x")
    broker_registry.track(  # if the env prefix were used, its names are cleaned up too
        prefix, broker_url, queues=other.queue_names(), exchanges=[e for e, _ in other.exchanges()]
    )
    settings = {
        "BRAMA_BROKER_URL": broker_url,
        "BRAMA_PREFIX": other.prefix,
        "BRAMA_PREFETCH": "abc",
    }
    w = _start(workers, tmp_path, settings, "--prefix", prefix, "--prefetch", "7")
    log = w.output()
    assert f"prefix {prefix}," in log and f"owner serving {prefix}.owner" in log, log
    with Brama(transport=amqp_transport) as client:
        applied = client.register("flagged", wait=True)
        assert applied is not None and applied.event_names == [
            "registration", "connection_registered"
        ]
    with pytest.raises(amqp.NotFound):
        _depth(broker_url, other.owner_queue())
    w.terminate()
    assert w.wait(20) == 0


BAD_SETTINGS = [
    ({"BRAMA_PREFETCH": "abc"}, [], "BRAMA_PREFETCH"),
    ({"BRAMA_PREFETCH": "0"}, [], "prefetch"),
    ({"BRAMA_SHARDS": "0"}, [], "shards"),
    ({"BRAMA_PREFIX": "a.b"}, [], "prefix"),
    ({"BRAMA_LOG_LEVEL": "loud"}, [], "log_level"),
    ({}, ["--shard", "1"], "--shard"),
    ({"BRAMA_SHARDS": "4"}, ["--shard", "4"], "--shard"),
    ({}, ["--shard", "-1"], "--shard"),
    ({"BRAMA_SHARDS": "4"}, [], "--shard"),
    ({}, ["--shards", "3"], "--shard"),
    ({"BRAMA_RECONNECT_TIMEOUT": "soon"}, [], "BRAMA_RECONNECT_TIMEOUT"),
    ({}, ["--reconnect-timeout", "-1"], "--reconnect-timeout"),
    ({"BRAMA_SNAPSHOT_INTERVAL": "0"}, [], "BRAMA_SNAPSHOT_INTERVAL"),
]


@pytest.mark.parametrize(("env", "args", "named"), BAD_SETTINGS)
def test_bad_settings_exit_2_with_one_line(env: dict[str, str], args: list[str], named: str
                                           ) -> None:
    """A bad setting exits 2 before connecting, with one line naming it and nothing else."""
    dead = f"amqp://guest:guest@127.0.0.1:{brokers.free_port()}//"
    done = run_cli(["worker", *args], {"BRAMA_BROKER_URL": dead, **env}, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("brama-mq: "), done.stderr
    assert named in lines[0]


# -- secrets --------------------------------------------------------------------------


def _assert_no_secret(output: str, password: str) -> None:
    for form in {password, quote(password, safe="")}:
        assert form not in output, f"password leaked:\n{output}"


@pytest.mark.parametrize("raw_at", [False, True], ids=["plain", "raw-at-sign"])
def test_password_never_logged_when_the_broker_is_away(raw_at: bool) -> None:
    """Refused connection: exit 1, the error names the broker with its password masked
    (also when the password holds an unencoded "@", which URL parsers accept)."""
    token = secrets.token_hex(8)
    password = f"Sekr1t@{token}" if raw_at else f"Sekr1t-{token}"
    url = f"amqp://brama:{password}@127.0.0.1:{brokers.free_port()}//"
    done = run_cli(["worker", "--log-level", "DEBUG"], {"BRAMA_BROKER_URL": url}, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    _assert_no_secret(output, password)
    assert token not in output, output
    assert "amqp://brama:**@127.0.0.1" in output, output
    assert output.strip().splitlines()[-1].startswith("brama-mq: "), output


def test_two_workers_single_active_consumer_and_takeover(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    """Two workers: one gets every command; kill -9 it and the standby takes over with
    the registry intact: every failure sent (confirmed) counted exactly once, none
    dead-lettered, and the new owner goes on with the same connections."""
    topo = amqp_transport.topology
    amqp_transport.declare()
    tap = KombuTap(broker_url, topo.events_exchange, ["#"])
    client = Brama(transport=amqp_transport)
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    stop = threading.Event()
    sent = 0
    try:
        active = _start(workers, tmp_path, settings)
        active.wait_for_log("owner active")  # it has the queue before the standby starts
        standby = _start(workers, tmp_path, settings)
        names = [f"a{i}" for i in range(10)]
        for n in names:
            client.register(n, scope="s", wait=True, max_attempts=1_000_000)

        def send_forever() -> None:
            nonlocal sent
            while not stop.is_set():
                client.failure(names[sent % len(names)], scope="s")
                sent += 1

        sender = threading.Thread(target=send_forever, daemon=True)
        sender.start()
        tap.wait_for(lambda s: sum(x.event == "failure" for x in s) >= 300, timeout=30)
        assert "owner active" not in standby.output(), "the standby took the queue"

        active.kill()
        assert active.wait(10) == -9
        standby.wait_for_log("owner active", timeout=10)
        time.sleep(0.5)  # commands keep flowing to the new owner
        stop.set()
        sender.join(30)
        # The new active owner knows every connection and every failure, once.
        deadline = time.monotonic() + 20
        while True:
            counted = sum(client.status(n, scope="s")["failure_count"] for n in names)
            if counted >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counted == sent, (counted, sent)
        assert all(client.status(n, scope="s")["state"] == "closed" for n in names)
        fresh = [f"b{i}" for i in range(5)]
        for n in fresh:
            applied = client.register(n, scope="s", wait=True)
            assert applied is not None and applied.status == "applied"
        assert _depth(broker_url, topo.dead_queue) == 0
        assert standby.alive()
        standby.terminate()
        assert standby.wait(20) == 0
    finally:
        stop.set()
        tap.close()
        client.disconnect()


# -- a private node, for a user of our own ---------------------------------------------


def test_password_never_logged_on_a_real_broker(
    private_node: brokers.PrivateNode, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess], broker_registry: brokers.Registry,
) -> None:
    """With a user of its own (odd characters in the password), the worker's output never
    shows the password: not at DEBUG, not across a reconnect, not on refused login."""
    token = secrets.token_hex(8)
    password = f"Pw@{token}/x%y"
    user = f"u{secrets.token_hex(4)}"
    private_node.ctl("add_user", user, password)
    try:
        private_node.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        url = f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:{private_node.port}//"
        broker_registry.track(prefix, private_node.url)
        settings = {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix}
        w = _start(workers, tmp_path, settings, "--log-level", "DEBUG")
        transport = AmqpTransport(url, Topology(prefix))
        try:
            with Brama(transport=transport) as client:
                assert client.register("secretive", wait=True) is not None
                private_node.close_connections()  # the worker logs its reconnect
                w.wait_for_log("(epoch 2)", timeout=30)
                assert client.register("secretive2", wait=True) is not None
        finally:
            transport.close()
        w.terminate()
        assert w.wait(20) == 0
        output = w.output()
        _assert_no_secret(output, password)
        assert token not in output, output
        assert f"amqp://{user}:**@127.0.0.1:{private_node.port}//" in output, output
        assert "lost its connection" in output

        wrong = url.replace(quote(password, safe=""), quote(password + "-nope", safe=""))
        done = run_cli(["worker", "--log-level", "DEBUG"], {"BRAMA_BROKER_URL": wrong})
        refused = done.stdout + done.stderr
        assert done.returncode == 1, refused
        _assert_no_secret(refused, password)
        _assert_no_secret(refused, password + "-nope")
        assert token not in refused, refused
        assert re.search(r"ACCESS_REFUSED|AccessRefused|check the user", refused), refused
    finally:
        with contextlib.suppress(Exception):
            private_node.ctl("delete_user", user)
