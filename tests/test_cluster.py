"""brama_mq on a real three-node RabbitMQ cluster, with a node lost, frozen or cut off.

Each test runs :func:`tests.cluster_scenario.run_scenario`: two worker processes with
the failover list (the active one on c1, which also leads the owner queue and the
streams; the standby on c2), a producer streaming register + 3 failures for 200
connections from c3, an independent quorum-queue observer on c2, and one fault once
40 % of the stream is sent. Every test pins the same promises (issue 14): every circuit
that must be open is open (asked of the owner), no critical event lost, no ``seq`` gap,
never two owners applying in one epoch, both workers alive at the end. How long events
stopped is printed (and measured by ``python -m bench cluster``), not asserted here.

Run alone with ``pytest -m cluster``. The partition needs iptables (``.ci/run`` installs
it) and root; without either the test fails saying so.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import brokers
from tests.cluster import PrivateCluster, iptables_available
from tests.cluster_scenario import (
    FREEZE_S,
    PARTITION_S,
    Fault,
    Outcome,
    delete_deployment,
    restore,
    run_scenario,
)

pytestmark = [pytest.mark.cluster, pytest.mark.private_node, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """One cluster for the module (10-20 s to start); each test restores it first."""
    with brokers.running(PrivateCluster(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


@pytest.fixture
def healthy(cluster: PrivateCluster, tmp_path: Path) -> Iterator[tuple[PrivateCluster, str]]:
    """The cluster with all three nodes running, a fresh prefix, and that prefix's
    queues and exchanges deleted afterwards (from a node that is up)."""
    restore(cluster)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield cluster, prefix
    restore(cluster)
    delete_deployment(cluster, prefix)


def _run(healthy: tuple[PrivateCluster, str], tmp_path: Path, name: str, fault: Fault,
         **kwargs: object) -> Outcome:
    cluster, prefix = healthy
    outcome = run_scenario(cluster, tmp_path, prefix, name, fault, **kwargs)  # type: ignore[arg-type]
    print(f"{name}: events flowed again after {outcome.recovery_s} s "
          f"(longest pause {outcome.longest_pause_s:.2f} s); epochs {outcome.worker_epochs}")
    assert not outcome.problems(), outcome.report()
    return outcome


def test_kill_of_the_node_leading_the_owner_queue_and_holding_the_active_owner(
    healthy: tuple[PrivateCluster, str], tmp_path: Path
) -> None:
    """kill -9 of c1 (leader of the owner queue and streams, the active owner's node):
    the standby on c2 takes over, the old owner reconnects to another node as a standby;
    nothing is lost and every circuit opens."""
    outcome = _run(healthy, tmp_path, "kill -9 leader node", lambda c: c.kill(0))
    assert sum(len(e) for e in outcome.worker_epochs) >= 2  # a takeover happened


def test_kill_of_a_follower_node(healthy: tuple[PrivateCluster, str], tmp_path: Path) -> None:
    """kill -9 of c3, which leads nothing but holds the producer's connection: the
    producer buffers and reconnects to another node; the owner never notices."""
    _run(healthy, tmp_path, "kill -9 follower node", lambda c: c.kill(2))


def test_frozen_node_for_30_s(healthy: tuple[PrivateCluster, str], tmp_path: Path) -> None:
    """SIGSTOP of c1 for 30 s, then SIGCONT: the active owner's lease runs out (no
    confirm from a frozen node) so it stops acting and reconnects elsewhere; the standby
    gets the queue once the cluster declares c1 down (net_ticktime); after the thaw c1
    rejoins and neither worker exits."""
    outcome = _run(healthy, tmp_path, f"SIGSTOP leader node {FREEZE_S:.0f} s",
                   lambda c: c.freeze(0), after_fault=lambda c: c.thaw(0), hold_s=FREEZE_S)
    assert outcome.recovery_s is not None


def test_partition_of_the_leader_node(
    healthy: tuple[PrivateCluster, str], tmp_path: Path
) -> None:
    """c1's traffic with c2 and c3 dropped (iptables) for 3 x net_ticktime while its
    clients' AMQP traffic still flows: pause_minority pauses c1, which closes its client
    connections; the owner continues on the majority side; after the heal c1 rejoins."""
    problem = iptables_available()
    assert problem is None, problem
    _run(healthy, tmp_path, f"partition leader node {PARTITION_S} s",
         lambda c: c.partition(0), after_fault=lambda c: c.heal(0), hold_s=PARTITION_S)
