"""How an owner starts against a broker that is not fully up.

A node that accepts connections while its durable queues and streams are still coming
back answers ``NOT_FOUND - home node ... is down or inaccessible`` (seen in CI right after
a private node restart): the owner waits for it within its reconnect window instead of
exiting. Anything else on the first connection (refused, wrong credentials) still fails
at once, so a wrong URL is reported immediately. The owner and transport are real (the
embedded transport); only the broker's answers to the first declares are scripted."""

from __future__ import annotations

import pytest

from brama_mq.errors import BrokerStartingError, BrokerUnavailableError
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Topology
from brama_mq.transport.memory import MemoryTransport


class StartingBroker(MemoryTransport):
    """The embedded transport whose first declares fail as a starting node's do."""

    def __init__(self, failures: list[Exception], reconnect_timeout: float) -> None:
        super().__init__(Topology("startup"))
        self.failures = failures
        self.reconnect_timeout = reconnect_timeout
        self.declares = 0

    def declare(self) -> None:
        self.declares += 1
        if self.failures:
            raise self.failures.pop(0)
        super().declare()


def _starting() -> BrokerStartingError:
    return BrokerStartingError("declare topology failed: home node is down or inaccessible")


def test_a_starting_node_is_waited_for() -> None:
    """Two 'still starting' answers, then the owner serves."""
    transport = StartingBroker([_starting(), _starting()], reconnect_timeout=10)
    owner = run_owner(transport)  # returns once it serves
    try:
        assert transport.failures == [] and transport.declares >= 3
        assert owner.ready.is_set()
    finally:
        owner.stop(wait=10)


def test_a_node_that_never_comes_up_fails_after_the_window() -> None:
    """Still starting after the reconnect window: the error reaches the caller."""
    transport = StartingBroker([_starting() for _ in range(100)], reconnect_timeout=0.5)
    with pytest.raises(BrokerStartingError):
        Owner(transport).run()
    assert 2 <= transport.declares < 100


def test_an_unreachable_broker_fails_at_once() -> None:
    """Refused on the first connection: no waiting, so a wrong URL shows at once."""
    transport = StartingBroker([BrokerUnavailableError("connection refused")],
                               reconnect_timeout=10)
    with pytest.raises(BrokerUnavailableError):
        Owner(transport).run()
    assert transport.declares == 1
