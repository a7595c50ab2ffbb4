"""Shared fixtures: the broker (env var, testcontainers, or fail), per-test prefixes
with cleanup, transports, and private throwaway RabbitMQ nodes (see tests/brokers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brama_mq.transport.amqp import AmqpTransport
from brama_mq.transport.memory import MemoryTransport
from brama_mq.transport.topology import Topology

try:  # `python -m pytest` from the repo root: tests is a namespace package
    from tests import brokers
    from tests.worker_proc import WorkerProcess
except ImportError:  # pytest put tests/ itself on sys.path
    import brokers  # type: ignore[no-redef]
    from worker_proc import WorkerProcess  # type: ignore[no-redef]


@pytest.fixture(scope="session")
def broker_registry() -> brokers.Registry:
    """What each test declared on which broker, for cleanup."""
    return brokers.Registry()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The broker for the session: BRAMA_TEST_BROKER_URL, else testcontainers, else FAIL."""
    problem = None
    try:
        url, cleanup = brokers.resolve_broker()
    except brokers.BrokerSetupError as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield url
    finally:
        cleanup()


@pytest.fixture
def prefix(broker_registry: brokers.Registry, request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique name prefix; at teardown everything tracked under it is deleted, and when
    the test used the shared broker, the prefix's topology there too (worker processes
    declare it without the test tracking anything)."""
    p = f"t{uuid.uuid4().hex[:10]}"
    yield p
    also = [request.getfixturevalue("broker_url")] if "broker_url" in request.fixturenames else []
    errors = broker_registry.sweep(p, also)
    assert not errors, errors


@pytest.fixture
def topology(prefix: str) -> Topology:
    """The topology under the test's prefix."""
    return Topology(prefix)


@pytest.fixture
def amqp_transport(
    broker_url: str, topology: Topology, broker_registry: brokers.Registry
) -> Iterator[AmqpTransport]:
    """An AmqpTransport on the test broker; closed and its names deleted at teardown."""
    transport = AmqpTransport(broker_url, topology, connect_timeout=5, reconnect_timeout=20)
    broker_registry.track_transport(topology.prefix, transport)
    yield transport
    transport.close()


@pytest.fixture
def memory_transport(topology: Topology) -> Iterator[MemoryTransport]:
    """An in-process transport."""
    transport = MemoryTransport(topology)
    yield transport
    transport.close()


@pytest.fixture(scope="session")
def _session_private_node(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[brokers.PrivateNode]:
    """One throwaway node for every module that takes ``private_node`` (a start costs
    7-25 s here; tests keep apart by prefix, and each leaves the node's settings as it
    found them)."""
    base: Path = tmp_path_factory.mktemp("rabbit")
    with brokers.running(brokers.PrivateNode(base)) as node:
        yield node


@pytest.fixture(scope="module")
def private_node(_session_private_node: brokers.PrivateNode) -> brokers.PrivateNode:
    """A throwaway rabbitmq-server node (stop/start/restart freely); running when handed out."""
    node = _session_private_node
    if not node.running():  # an earlier module stopped it and failed before restarting
        node.start()
    return node


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes started by the test; killed at teardown if still running."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.close()
