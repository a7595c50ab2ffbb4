"""Test broker provisioning: which broker the tests use, cleanup, private throwaway nodes.

The rule of the house: ``BRAMA_TEST_BROKER_URL`` when set; else a testcontainers
RabbitMQ when a Docker engine answers; otherwise the tests that need a broker FAIL
(never skip) with a message saying how to provide one.

:class:`PrivateNode` starts a ``rabbitmq-server`` node of its own (own node name, AMQP
port, distribution port, data/log/config directories and Erlang cookie) that tests
may stop, restart and disconnect without touching the shared node.

Tests may import kombu/amqp (only the brama_mq package is bound by the layering rule):
:class:`WireProbe` watches the wire with plain py-amqp, independent of the code under test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import amqp
import pytest
from kombu import Connection

from brama_mq.transport.errors import mask_url
from brama_mq.transport.topology import Topology

ENV_URL = "BRAMA_TEST_BROKER_URL"
HOW_TO = (
    "no RabbitMQ for the tests: set BRAMA_TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// "
    "(e.g. after `rabbitmq-server -detached`) or start Docker so testcontainers can run one"
)


class BrokerSetupError(RuntimeError):
    """No broker could be provided; the message says how to provide one."""


# -- which broker --------------------------------------------------------------------


def probe_amqp(url: str, timeout: float = 3.0) -> None:
    """Open and close one connection to ``url`` (raises on failure)."""
    conn = Connection(url, connect_timeout=timeout)
    try:
        conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
    finally:
        conn.release()


def docker_answers(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping within ``timeout`` (False on any error)."""
    try:
        import docker

        client = docker.from_env(timeout=int(max(1, timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def resolve_broker() -> tuple[str, Callable[[], None]]:
    """``(url, cleanup)`` of the broker for this test session, per the rule above."""
    url = os.environ.get(ENV_URL)
    if url:
        try:
            probe_amqp(url)
        except Exception as exc:
            raise BrokerSetupError(
                f"{ENV_URL}={mask_url(url)} does not answer ({type(exc).__name__}: {exc}); "
                "start that broker or point the variable at one that runs"
            ) from exc
        return url, lambda: None
    if docker_answers():
        return _container_broker()
    raise BrokerSetupError(HOW_TO)


RABBITMQ_IMAGE = "rabbitmq:3.10"


def _container_broker() -> tuple[str, Callable[[], None]]:
    """Start RabbitMQ in a container; ``(url, stop)``.

    testcontainers' RabbitMqContainer probes readiness with pika; when pika is not
    installed the generic DockerContainer is used and readiness probed with py-amqp.
    """
    container: Any
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(RABBITMQ_IMAGE).start()
    except ImportError:
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(RABBITMQ_IMAGE).with_exposed_ports(5672).start()
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        url = f"amqp://guest:guest@{host}:{port}//"
        deadline = time.monotonic() + 90
        while True:
            try:
                probe_amqp(url)
                return url, container.stop
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise BrokerSetupError(
                        f"the RabbitMQ container did not answer: {exc!r}"
                    ) from exc
                time.sleep(0.5)
    except BaseException:
        container.stop()
        raise


# -- cleanup -------------------------------------------------------------------------


@dataclass
class _Tracked:
    urls: set[str] = field(default_factory=set)
    queues: set[str] = field(default_factory=set)
    exchanges: set[str] = field(default_factory=set)
    transports: list[Any] = field(default_factory=list)


#: Shard counts a test may use; the sweep deletes the names of each.
_MOST_SHARDS_IN_TESTS = 4


class Registry:
    """What each test prefix declared where, so its teardown deletes exactly that."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_prefix: dict[str, _Tracked] = {}

    def _get(self, prefix: str) -> _Tracked:
        with self._lock:
            return self._by_prefix.setdefault(prefix, _Tracked())

    def track(self, prefix: str, url: str, *, queues: Iterable[str] = (),
              exchanges: Iterable[str] = ()) -> None:
        """Remember names declared on ``url`` under ``prefix``."""
        t = self._get(prefix)
        t.urls.add(url)
        t.queues.update(queues)
        t.exchanges.update(exchanges)

    def track_transport(self, prefix: str, transport: Any) -> Any:
        """Remember an AmqpTransport; what it declared is deleted at teardown."""
        t = self._get(prefix)
        t.urls.add(transport.url)
        t.transports.append(transport)
        return transport

    def sweep(self, prefix: str, also: Iterable[str] = ()) -> list[str]:
        """Delete everything tracked under ``prefix`` (on ``also`` too: the URLs of brokers
        the test used without tracking anything, e.g. through worker processes); returns
        the errors (not raised)."""
        with self._lock:
            t = self._by_prefix.pop(prefix, None)
        if t is None:
            if not also:
                return []
            t = _Tracked()
        t.urls.update(also)
        queues, exchanges = set(t.queues), set(t.exchanges)
        for transport in t.transports:
            with contextlib.suppress(Exception):
                transport.close()
            for kind, name in transport.declared():
                (queues if kind == "queue" else exchanges).add(name)
        for shards in range(1, _MOST_SHARDS_IN_TESTS + 1):  # sharded names too
            topo = Topology(prefix, shards)
            queues.update(topo.queue_names())
            exchanges.update(name for name, _ in topo.exchanges())
        errors = []
        for url in t.urls:
            try:
                delete_names(url, sorted(queues), sorted(exchanges))
            except Exception as exc:
                errors.append(f"cleanup of {prefix} on {mask_url(url)}: {exc!r}")
        return errors


def delete_names(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    """Delete queues and exchanges by name (absent ones are fine); server-named skipped."""
    with Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        ch = conn.connection.channel()
        for q in queues:
            if not q.startswith("amq."):
                ch.queue_delete(q)
        for e in exchanges:
            if not e.startswith("amq."):
                ch.exchange_delete(e)
        ch.close()


# -- watching the wire ---------------------------------------------------------------


class WireProbe:
    """A queue read with plain py-amqp, to check what reached the broker.

    ``declare=True`` creates a durable classic queue bound with ``keys`` to ``exchange``
    (register it for cleanup); ``declare=False`` reads an existing queue.
    """

    def __init__(self, url: str, queue: str, *, exchange: str | None = None,
                 keys: Iterable[str] = (), declare: bool = True) -> None:
        self.url = url
        self.queue = queue
        self._conn = Connection(url, connect_timeout=5)
        self._conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        self._ch = self._conn.connection.channel()
        if declare:
            self._ch.queue_declare(queue, durable=True, auto_delete=False)
            for key in keys:
                assert exchange is not None
                self._ch.queue_bind(queue, exchange, key)

    def depth(self) -> int:
        """Ready messages in the queue (passive declare)."""
        return int(self._ch.queue_declare(self.queue, passive=True).message_count)

    def wait_depth(self, n: int, timeout: float = 10.0) -> int:
        """Poll until the queue holds at least ``n`` (returns the last depth seen)."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.depth()
            if d >= n or time.monotonic() > deadline:
                return d
            time.sleep(0.05)

    def take(self, limit: int = 100_000) -> list[Any]:
        """Get (and ack) up to ``limit`` ready messages, as py-amqp messages."""
        out = []
        while len(out) < limit:
            msg = self._ch.basic_get(self.queue, no_ack=True)
            if msg is None:
                break
            out.append(msg)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.release()


# -- private throwaway nodes ---------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rabbit_bin(name: str) -> str:
    """Path of a RabbitMQ script that runs as the current user.

    Debian's /usr/sbin wrappers switch to the ``rabbitmq`` user (whose HOME, cookie and
    permissions are not ours), so the scripts under /usr/lib/rabbitmq/bin win;
    ``BRAMA_RABBITMQ_BIN`` names another directory (e.g. a generic-unix tarball's sbin).
    """
    for d in (os.environ.get("BRAMA_RABBITMQ_BIN"), "/usr/lib/rabbitmq/bin"):
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    found = shutil.which(name)
    if not found:
        raise BrokerSetupError(f"{name} not found: install RabbitMQ or set BRAMA_RABBITMQ_BIN")
    return found


def _plugins_dir(bin_path: str) -> Path | None:
    """The RabbitMQ install's plugins directory (it holds the core apps too), if found."""
    home = Path(os.path.realpath(bin_path)).parent.parent  # .../rabbitmq_server-X/sbin/..
    found = home / "plugins"
    return found if (found / "README").exists() or any(found.glob("rabbit-*")) else None


def _app_deps(app_dir: Path) -> set[str]:
    app = app_dir.name.rsplit("-", 1)[0]
    try:
        text = (app_dir / "ebin" / f"{app}.app").read_text()
    except OSError:
        return set()
    deps: set[str] = set()
    for key in ("applications", "included_applications"):
        m = re.search(r"\{" + key + r",\s*\[(.*?)\]\}", text, re.S)
        if m:
            deps |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return deps


def core_plugins(base: Path, bin_path: str) -> Path | None:
    """A plugins directory under ``base`` holding only ``rabbit`` and what it depends on.

    A node scans every app of its plugins directory for feature flags while it boots;
    the install's directory holds 70 of them, and on these machines that scan made a
    start take 11-25 s instead of 7. The tests enable no plugin, so the core is enough.
    None when the install's layout is not the one expected (the default is used then).
    """
    source = _plugins_dir(bin_path)
    if source is None:
        return None
    by_app = {d.name.rsplit("-", 1)[0]: d for d in source.iterdir() if d.is_dir()}
    if "rabbit" not in by_app:
        return None
    need: set[str] = set()
    todo = ["rabbit", "rabbitmq_prelaunch"]
    while todo:
        app = todo.pop()
        if app in need or app not in by_app:
            continue
        need.add(app)
        todo.extend(_app_deps(by_app[app]))
    target = base / "plugins"
    target.mkdir(parents=True, exist_ok=True)
    for app in need:
        link = target / by_app[app].name
        if not link.exists():
            link.symlink_to(by_app[app])
    return target


class PrivateNode:
    """A throwaway ``rabbitmq-server`` node under ``base``; never touches the shared node.

    Own node name ``brama-test-<hex>@localhost``, AMQP port, distribution port,
    MNESIA/LOG base, config file, enabled-plugins file, and HOME with a fresh Erlang
    cookie (so the CLI tools talk to this node only). It registers with the machine's
    epmd like every node does. Its plugins directory holds only the core apps
    (:func:`core_plugins`); it is stopped with SIGTERM (RabbitMQ's graceful shutdown) and
    closed with SIGKILL, since ``rabbitmqctl`` costs an Erlang VM start (1-2 s) per call.
    Measured here: a start takes 7-8 s (11-25 s with the install's 70 plugins).
    """

    def __init__(
        self,
        base: Path,
        *,
        start_timeout: float = 90.0,
        name: str | None = None,
        cookie: str | None = None,
        conf: str = "",
        erl_args: str = "",
    ) -> None:
        """``name``, ``cookie``, ``conf`` (more rabbitmq.conf lines) and ``erl_args``
        (more VM arguments) let :class:`tests.cluster.PrivateCluster` join nodes."""
        self.base = base
        self.name = name or f"brama-test-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.start_timeout = start_timeout
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._home = base / "home"
        for d in (self._home, base / "mnesia", base / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie_file = self._home / ".erlang.cookie"
        cookie_file.write_text(cookie or secrets.token_hex(20).upper())
        cookie_file.chmod(0o400)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
            "disk_free_limit.absolute = 10MB\n" + conf
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self._home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-kernel inet_dist_use_interface {127,0,0,1} " + erl_args
            ).strip(),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        plugins = core_plugins(base, rabbit_bin("rabbitmq-server"))
        if plugins is not None:
            self.env["RABBITMQ_PLUGINS_DIR"] = str(plugins)

    @property
    def url(self) -> str:
        """AMQP URL of this node (guest is allowed on loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE args...`` against this node only."""
        proc = subprocess.run(
            [rabbit_bin("rabbitmqctl"), "-n", self.name, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise BrokerSetupError(
                f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )
        return proc

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> float:
        """Start the node and wait until it accepts AMQP; returns the seconds it took."""
        if self.running():
            return 0.0
        t0 = time.monotonic()
        booted_before = self._startups_logged()
        log = open(self.base / "log" / "server.stdout", "ab")  # noqa: SIM115 (kept by Popen)
        try:
            self._proc = subprocess.Popen(
                [rabbit_bin("rabbitmq-server")], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        deadline = t0 + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise BrokerSetupError(
                    f"node {self.name} exited while starting:\n{self.log_tail()}"
                )
            try:
                c = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=1)
                c.connect()
                c.close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerSetupError(
                        f"node {self.name} did not answer within {self.start_timeout} s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        # What `rabbitmqctl await_startup` waits for, read from the node's own log.
        while self._startups_logged() <= booted_before:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise BrokerSetupError(
                    f"node {self.name} accepts AMQP but never logged its start-up:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        self.last_start_seconds = time.monotonic() - t0
        return self.last_start_seconds

    def _startups_logged(self) -> int:
        try:
            text = (self.base / "log" / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return 0
        return text.count("Server startup complete")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node gracefully (SIGTERM), killing it if it lingers."""
        if not self.running():
            return
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> float:
        """Stop, then start again with the same data; returns the start seconds."""
        self.stop()
        return self.start()

    def close_connections(self, reason: str = "brama test") -> None:
        """Close every client connection to this node (the node keeps running)."""
        self.ctl("close_all_connections", reason)

    def kill(self) -> None:
        """SIGKILL the node's whole process group (our own session only)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the node's whole process group (SIGSTOP/SIGCONT: a frozen node)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, sig)

    def close(self) -> None:
        """Kill the node's process group: its data is thrown away, so no shutdown."""
        self.kill()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's log files, for failure messages."""
        out = []
        for f in sorted((self.base / "log").glob("*")):
            if f.is_file():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)


class Startable(Protocol):
    """A private node or cluster: started once, closed (killed, data gone) after."""

    def start(self) -> float: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=Startable)


@contextlib.contextmanager
def running(node: S, setup: Callable[[S], object] = lambda _: None) -> Iterator[S]:
    """``node`` (a node or a cluster) started, then ``setup(node)``, for the ``with``
    block, closed after it.

    A node that cannot start, or whose setup fails, fails the test with the node's own
    words (outside the ``except``, so the report is not a chained traceback)."""
    problem = None
    try:
        node.start()
        setup(node)
    except BrokerSetupError as exc:
        node.close()
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield node
    finally:
        node.close()
