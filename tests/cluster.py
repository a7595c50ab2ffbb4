"""A private three-node RabbitMQ cluster on loopback, and the faults tests inject into it.

Each node is a :class:`~tests.brokers.PrivateNode` (own name, AMQP port, distribution
port, data directory) sharing one Erlang cookie; the second and third join the first
with ``rabbitmqctl join_cluster``, as an operator would. Faults:

* :meth:`PrivateCluster.kill` - SIGKILL a node's process group (a crashed machine);
* :meth:`PrivateCluster.freeze` / :meth:`thaw` - SIGSTOP / SIGCONT it (a VM paused, a
  stop-the-world stall): its sockets stay open but nothing answers;
* :meth:`PrivateCluster.partition` / :meth:`heal` - drop its inter-node traffic with
  iptables while its clients' AMQP traffic still flows (a real network partition).

How the partition is made on one loopback interface: every node listens for the Erlang
distribution on 127.0.0.1 but *connects* to its peers from an address of its own
(127.X.Y.<i>, kernel option ``inet_dist_connect_options``), so a peer-to-peer packet is
recognisable by its addresses and ports, and a chain of our own in OUTPUT drops exactly
those packets. Client traffic (127.0.0.1 to the AMQP ports) and the CLI (from 127.0.0.1)
are untouched.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.brokers import BrokerSetupError, PrivateNode

#: Distribution tick: a peer silent this long (plus up to a quarter) is declared down.
#: RabbitMQ's default is 60 s; tests use 8 s so a frozen node is noticed in ~8-10 s.
NET_TICKTIME = 8


def iptables_available() -> str | None:
    """Why partitions cannot be made here (None when they can)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables; .ci/run does)"
    probe = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"iptables cannot read the filter table: {probe.stderr.strip()}"
    return None


class PrivateCluster:
    """``size`` private nodes joined into one cluster under ``base``."""

    def __init__(self, base: Path, size: int = 3, *, net_ticktime: int = NET_TICKTIME,
                 partition_handling: str = "pause_minority") -> None:
        tag = secrets.token_hex(3)
        cookie = secrets.token_hex(20).upper()
        # A /24 of loopback source addresses of this cluster's own, so two clusters at
        # once (two test workers) never match each other's rules.
        net = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.chain = f"BRAMA_{tag.upper()}"
        self.sources = [f"{net}.{i + 1}" for i in range(size)]
        conf = (
            f"cluster_partition_handling = {partition_handling}\n"
            f"net_ticktime = {net_ticktime}\n"
        )
        self.nodes = [
            PrivateNode(
                base / f"c{i + 1}",
                name=f"brama-c{i + 1}-{tag}@localhost",
                cookie=cookie,
                conf=conf,
                erl_args=(
                    "-kernel inet_dist_connect_options "
                    f"[{{ip,{{{self.sources[i].replace('.', ',')}}}}}]"
                ),
            )
            for i in range(size)
        ]
        self._chain_made = False
        self._cut: set[int] = set()

    # -- life ------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The failover list (kombu's ``;`` form), first node first."""
        return ";".join(self.urls)

    def url_from(self, first: int) -> str:
        """The failover list starting at node ``first`` (clients spread over nodes)."""
        urls = self.urls
        return ";".join(urls[first:] + urls[:first])

    def start(self) -> float:
        """Start every node (in parallel), join the others to the first; returns seconds."""
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def boot(node: PrivateNode) -> None:
            try:
                node.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.wait_members(len(self.nodes))
        return time.monotonic() - t0

    def running_members(self, via: int = 0) -> list[str]:
        """Names of the nodes ``via`` sees running in the cluster."""
        out = self.nodes[via].ctl("eval", "rabbit_nodes:all_running().", timeout=30).stdout
        return [n for n in (node.name for node in self.nodes) if n in out]

    def wait_members(self, count: int, via: int = 0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            seen = self.running_members(via)
            if len(seen) >= count:
                return
            if time.monotonic() > deadline:
                raise BrokerSetupError(
                    f"cluster has {seen} running, wanted {count}:\n{self.nodes[via].log_tail()}"
                )
            time.sleep(0.5)

    def leader_of(self, queue: str, via: int = 0) -> int | None:
        """Index of the node leading the quorum queue or stream ``queue`` (None if none)."""
        out = self.nodes[via].ctl(
            "list_queues", "name", "leader", "--no-table-headers", "--quiet", timeout=30
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == queue:
                for i, node in enumerate(self.nodes):
                    if parts[1] == node.name:
                        return i
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.heal_all()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.signal_group(signal.SIGCONT)
            node.close()
        if self._chain_made:
            _iptables("-D", "OUTPUT", "-j", self.chain, check=False)
            _iptables("-X", self.chain, check=False)
            self._chain_made = False

    # -- faults ----------------------------------------------------------------------
    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (start it again with :meth:`restart`)."""
        self.nodes[i].kill()

    def restart(self, i: int) -> float:
        """Start a killed node again with its data: it rejoins the cluster by itself."""
        return self.nodes[i].start()

    def freeze(self, i: int) -> None:
        self.nodes[i].signal_group(signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        self.nodes[i].signal_group(signal.SIGCONT)

    def partition(self, i: int) -> None:
        """Cut node ``i``'s traffic with its peers (both directions), nothing else."""
        if i in self._cut:
            return
        if not self._chain_made:
            _iptables("-N", self.chain)
            _iptables("-I", "OUTPUT", "-j", self.chain)
            self._chain_made = True
        for rule in self._rules(i):
            _iptables("-A", self.chain, *rule)
        self._cut.add(i)

    def heal(self, i: int) -> None:
        if i not in self._cut:
            return
        for rule in self._rules(i):
            _iptables("-D", self.chain, *rule, check=False)
        self._cut.discard(i)

    def heal_all(self) -> None:
        for i in list(self._cut):
            self.heal(i)

    def _rules(self, i: int) -> list[list[str]]:
        me = self.sources[i]
        my_port = str(self.nodes[i].dist_port)
        peers = ",".join(s for j, s in enumerate(self.sources) if j != i)
        peer_ports = ",".join(str(n.dist_port) for j, n in enumerate(self.nodes) if j != i)
        drop = ["-j", "DROP"]
        return [
            # i connecting to a peer, and the peer's answers
            ["-s", me, "-p", "tcp", "-m", "multiport", "--dports", peer_ports, *drop],
            ["-d", me, "-p", "tcp", "-m", "multiport", "--sports", peer_ports, *drop],
            # a peer connecting to i, and i's answers
            ["-s", peers, "-p", "tcp", "--dport", my_port, *drop],
            ["-d", peers, "-p", "tcp", "--sport", my_port, *drop],
        ]


def _iptables(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["iptables", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise BrokerSetupError(f"iptables {' '.join(args)} failed: {proc.stderr.strip()}")


@contextlib.contextmanager
def running_cluster(base: Path, size: int = 3) -> Iterator[PrivateCluster]:
    """A started cluster for the ``with`` block, closed (nodes killed, rules gone) after."""
    cluster = PrivateCluster(base, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
