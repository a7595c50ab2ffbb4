"""Permissions, vhost tenants, TLS and secrets on one private broker node (issue 7, 2-5).

The node is started once for the module with a TLS listener whose CA and server
certificate the fixture makes with the openssl CLI; users get exactly the permissions of
:func:`brama_mq.transport.topology.permission_layout` (the layout docs/operations.md shows).
"""

from __future__ import annotations

import logging
import secrets
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import amqp
import pytest
from amqp.exceptions import AccessRefused
from celery import Celery

import brama_mq
from brama_mq.celery.runtime import runtime_for_app, shutdown_runtimes
from brama_mq.client import Brama
from brama_mq.errors import AccessRefusedError, BramaError, TransportError
from brama_mq.settings import Settings
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from brama_mq.transport.topology import permission_layout
from tests import brokers
from tests.metrics_helpers import free_port, scrape
from tests.wire import KombuTap
from tests.worker_proc import WorkerProcess, run_cli
from tests.worker_proc import start_worker as _worker

ROOT = Path(__file__).resolve().parent.parent
#: Every password of this module: the secrets test looks for each of them in output.
PASSWORDS: dict[str, str] = {}


@dataclass
class Locked:
    node: brokers.PrivateNode
    tls_port: int
    certs: Path

    def url(self, user: str, vhost: str = "", *, tls: bool = False) -> str:
        scheme, port = ("amqps", self.tls_port) if tls else ("amqp", self.node.port)
        password = "guest" if user == "guest" else PASSWORDS[user]
        return f"{scheme}://{user}:{password}@127.0.0.1:{port}/{vhost}"

    @property
    def ca(self) -> str:
        return str(self.certs / "ca.pem")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=brama test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    # A client certificate from the same CA, and one from a CA the broker does not know.
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=brama-client",
             "-keyout", "client.key", "-out", "client.csr", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "client.pem", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=rogue", "-keyout", "rogue.key", "-out", "rogue.pem", cwd=d)
    for f in d.iterdir():
        f.chmod(0o644)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """A private node with a TLS listener, a second vhost and one user per role."""
    base = tmp_path_factory.mktemp("locked")
    certs = base / "certs"
    make_certs(certs)
    node = brokers.PrivateNode(base / "node")
    tls_port = brokers.free_port()
    with open(base / "node" / "rabbitmq.conf", "a") as conf:
        conf.write(
            f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certs / 'ca.pem'}\n"
            f"ssl_options.certfile = {certs / 'server.pem'}\n"
            f"ssl_options.keyfile = {certs / 'server.key'}\n"
            # Ask for a client certificate and check it when one is sent; connections
            # without one are still allowed (the other tests use none).
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def second_vhost(n: brokers.PrivateNode) -> None:
        n.ctl("add_vhost", "tenant_b")
        n.ctl("set_permissions", "-p", "tenant_b", "guest", ".*", ".*", ".*")

    with brokers.running(node, second_vhost):
        yield Locked(node, tls_port, certs)


def _add_user(node: brokers.PrivateNode, role: str, prefix: str) -> str:
    user = f"{role}_{prefix}"
    PASSWORDS[user] = f"pw{secrets.token_hex(12)}"
    node.ctl("add_user", user, PASSWORDS[user])
    node.ctl("set_permissions", "-p", "/", user, *permission_layout(prefix)[role])
    return user






def _refused(url: str, action: Any) -> str:
    """Run ``action(channel)`` with plain py-amqp; the ACCESS_REFUSED text it must raise."""
    parts = urlsplit(url)
    conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid=parts.username,
                           password=parts.password, virtual_host=parts.path[1:] or "/")
    conn.connect()
    try:
        ch = conn.channel()
        with pytest.raises(AccessRefused) as info:
            action(ch)
            ch.basic_qos(0, 1, False)  # a round trip, so an async refusal surfaces here
        return str(info.value)
    finally:
        conn.collect()


def test_roles_do_their_job_and_nothing_else(
    locked: Locked, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """With the documented permissions only: the owner serves, a reporting service
    reports outcomes and reads states (RPC and events), a subscriber and a durable (named)
    subscriber receive events;
    the reporter cannot publish to {p}.events nor consume {p}.owner, the subscriber cannot
    publish commands; brama_mq components raise AccessRefusedError when they try."""
    node, prefix = locked.node, f"perm{uuid.uuid4().hex[:8]}"
    owner = _add_user(node, "owner", prefix)
    reporter = _add_user(node, "reporter", prefix)
    subscriber = _add_user(node, "subscriber", prefix)
    durable = _add_user(node, "durable_subscriber", prefix)
    topo = Topology(prefix)
    _worker(workers, tmp_path, {"BRAMA_BROKER_URL": locked.url(owner), "BRAMA_PREFIX": prefix})

    # The subscriber's job: events, through the public subscribe() API.
    sub = brama_mq.subscribe(broker_url=locked.url(subscriber), prefix=prefix,
                             events=["state_change"])
    named = brama_mq.subscribe(broker_url=locked.url(durable), prefix=prefix, name="audit",
                               events=["state_change"])
    client = Brama(locked.url(reporter), prefix=prefix).connect()
    try:
        # The reporter's job: register, report, read states (RPC and its own event queue).
        client.register("payment_api", scope="pay", max_attempts=2, wait=True)
        client.failure("payment_api", scope="pay")
        client.failure("payment_api", scope="pay", wait=True)
        assert client.status("payment_api", scope="pay")["state"] == "open"
        assert [r["connection"] for r in client.snapshot()] == ["payment_api"]
        view = brama_mq.subscribe(broker_url=locked.url(reporter), prefix=prefix)
        client.close("payment_api", scope="pay", wait=True)
        got = view.receive(timeout=10)
        assert got is not None and got.connection == "payment_api"
        view.close()
        first = sub.receive(timeout=10)
        assert first is not None and first.data["new_state"] == "open"
        kept = named.receive(timeout=10)
        assert kept is not None and kept.data["new_state"] == "open"
        named.delete()  # its own queues: within its configure permission

        # What they must not do, seen on the wire ...
        msg = amqp.Message(b"{}")
        text = _refused(locked.url(reporter),
                        lambda ch: ch.basic_publish(msg, topo.events_exchange, "x.y.z"))
        assert topo.events_exchange in text
        text = _refused(locked.url(reporter), lambda ch: ch.basic_consume(topo.owner_queue()))
        assert topo.owner_queue() in text
        text = _refused(locked.url(subscriber),
                        lambda ch: ch.basic_publish(msg, topo.commands_exchange, "owner"))
        assert topo.commands_exchange in text
        # ... and as brama_mq reports it.
        t = AmqpTransport(locked.url(reporter), topo, reconnect_timeout=2)
        with pytest.raises(AccessRefusedError, match="permissions"):
            t.owner_link()
        t.close()
        with Brama(locked.url(subscriber), prefix=prefix) as intruder, \
                pytest.raises(AccessRefusedError, match="permissions"):
            intruder.open("payment_api", scope="pay")
    finally:
        sub.close()
        named.close()
        client.disconnect()


def test_vhosts_isolate_deployments_with_the_same_prefix(
    locked: Locked, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """The same prefix in two vhosts of one node, an owner process in each: events and
    commands of one never reach the other."""
    prefix = f"vh{uuid.uuid4().hex[:8]}"
    urls = [locked.url("guest", ""), locked.url("guest", "tenant_b")]
    taps, clients = [], []
    try:
        for url in urls:
            _worker(workers, tmp_path, {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix})
            taps.append(KombuTap(url, f"{prefix}.events", ["#"]))
            clients.append(Brama(url, prefix=prefix))
        for i, client in enumerate(clients):
            client.register(f"conn_{i}", max_attempts=1, wait=True)
            client.failure(f"conn_{i}", wait=True)
        for i, tap in enumerate(taps):
            tap.wait_for(lambda seen, i=i: any(  # type: ignore[misc]
                s.event == "state_change" and s.body["connection"] == f"conn_{i}"
                for s in seen))
            tap.drain(0.5)
            assert {s.body["connection"] for s in tap.seen} == {f"conn_{i}"}
            assert [r["connection"] for r in clients[i].snapshot()] == [f"conn_{i}"]
    finally:
        for tap in taps:
            tap.close()
        for client in clients:
            client.disconnect()


def test_tls_worker_client_and_subscriber(
    locked: Locked, tmp_path: Path, workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over amqps:// with the test's CA: a worker process, a client, a subscriber, the CLI
    and the Celery runtime (from Celery's broker_use_ssl) work (the listener is TLS only);
    without the CA, verification fails at once with an error that says so, for the client,
    the CLI and the worker."""
    prefix = f"tls{uuid.uuid4().hex[:8]}"
    url = locked.url("guest", tls=True)
    env = {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix, "BRAMA_TLS_CA_FILE": locked.ca}
    w = _worker(workers, tmp_path, env)
    assert "TLS" in w.output()
    monkeypatch.setenv("BRAMA_TLS_CA_FILE", locked.ca)
    sub = brama_mq.subscribe(broker_url=url, prefix=prefix, events=["state_change"])
    settings = Settings.from_env({}, broker_url=url, prefix=prefix, tls_ca_file=locked.ca)
    client = Brama(settings=settings)
    try:
        client.register("tls_api", max_attempts=1, wait=True)
        client.failure("tls_api", wait=True)
        assert client.status("tls_api")["state"] == "open"
        got = sub.receive(timeout=10)
        assert got is not None and got.connection == "tls_api"
        conn = client.transport.new_kombu_connection()  # type: ignore[attr-defined]
        assert conn.ssl["ca_certs"] == locked.ca
        cli = run_cli(["status", "--json", "--tls-ca-file", locked.ca],
                      {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix})
        assert cli.returncode == 0 and "tls_api" in cli.stdout, cli.stderr
        # The Celery runtime, sharing Celery's amqps broker and its broker_use_ssl.
        monkeypatch.delenv("BRAMA_TLS_CA_FILE")
        app = Celery("tls_test", broker=url)
        app.conf.broker_use_ssl = {"ca_certs": locked.ca, "cert_reqs": ssl.CERT_REQUIRED}
        app.conf.brama_prefix = prefix
        runtime = runtime_for_app(app, wait=True)
        try:
            assert runtime.view.state("tls_api") == "open"
        finally:
            shutdown_runtimes()
    finally:
        sub.close()
        client.disconnect()
    # Verification failures: system CAs do not know the test CA.
    t0 = time.monotonic()
    with Brama(url, prefix=prefix) as stranger, pytest.raises(TransportError) as info:
        stranger.register("x")
    assert time.monotonic() - t0 < 10  # not retried for a minute
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and "BRAMA_TLS_CA_FILE" in str(
        info.value)
    cli = run_cli(["status"], {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix})
    assert cli.returncode == 1 and "certificate was not accepted" in cli.stderr, cli.stderr
    bad = _worker(workers, tmp_path, {"BRAMA_BROKER_URL": url, "BRAMA_PREFIX": prefix},
                  ready=False)
    assert bad.wait(timeout=30) == 1
    assert "certificate was not accepted" in bad.output(), bad.output()
    # A client certificate reaches the broker: one from its CA is accepted, a rogue one
    # makes the broker end the handshake.
    certs = locked.certs
    mine = Settings.from_env({}, broker_url=url, prefix=prefix, tls_ca_file=locked.ca,
                             tls_cert_file=str(certs / "client.pem"),
                             tls_key_file=str(certs / "client.key"))
    with Brama(settings=mine) as signed:
        assert signed.status("tls_api")["state"] == "open"
    rogue = Settings.from_env({}, broker_url=url, prefix=prefix, tls_ca_file=locked.ca,
                              tls_cert_file=str(certs / "rogue.pem"),
                              tls_key_file=str(certs / "rogue.key"))
    with Brama(settings=rogue) as impostor, pytest.raises(TransportError, match=r"SSL|TLS"):
        impostor.connect()
    # Verification off: encrypted, not authenticated (a test broker's escape hatch).
    loose = Settings.from_env({}, broker_url=url, prefix=prefix, tls_verify=False)
    with Brama(settings=loose) as lax:
        assert lax.status("tls_api")["state"] == "open"


def test_no_password_in_output(
    locked: Locked, tmp_path: Path, workers: list[WorkerProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker password appears nowhere: not in the worker's log (debug level, a
    reconnect, a refused login), not in its metrics labels, not in CLI output or errors,
    not in the client's log (a reconnect) or its errors, not in the repr of settings and
    transports."""
    caplog.set_level(logging.DEBUG, logger="brama_mq")
    node, prefix = locked.node, f"sec{uuid.uuid4().hex[:8]}"
    owner = _add_user(node, "owner", prefix)
    reporter = _add_user(node, "reporter", prefix)
    good, wrong = PASSWORDS[owner], f"wrong{secrets.token_hex(8)}"
    metrics_port = free_port()
    env = {"BRAMA_BROKER_URL": locked.url(owner), "BRAMA_PREFIX": prefix,
           "BRAMA_LOG_LEVEL": "DEBUG"}
    w = _worker(workers, tmp_path, {**env, "BRAMA_METRICS_PORT": str(metrics_port)})
    outputs: list[str] = []
    client = Brama(locked.url(reporter), prefix=prefix)
    try:
        client.register("s1", wait=True)
        node.close_connections("secrets test")  # reconnect warnings name the broker
        deadline = time.monotonic() + 20
        while "reconnect" not in w.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "reconnect" in w.output()
        client.register("s2", wait=True)
        status = run_cli(["status", "--json"], {**env, "BRAMA_BROKER_URL": locked.url(reporter)})
        assert status.returncode == 0 and "s1" in status.stdout, status.stderr
        outputs += [status.stdout, status.stderr]
        # every metric name and label value the worker exports
        samples = scrape(metrics_port)
        assert any(name.startswith("brama_") for name, _ in samples)
        outputs.append(repr(sorted(samples)))
    finally:
        client.disconnect()
    w.terminate()
    w.wait()
    outputs.append(w.output())
    bad_url = locked.url(owner).replace(good, wrong)
    refused = run_cli(["status"], {"BRAMA_BROKER_URL": bad_url, "BRAMA_PREFIX": prefix})
    assert refused.returncode == 1 and "ACCESS_REFUSED" in refused.stderr, refused.stderr
    outputs += [refused.stdout, refused.stderr]
    bad_worker = _worker(workers, tmp_path, {**env, "BRAMA_BROKER_URL": bad_url}, ready=False)
    assert bad_worker.wait(timeout=30) == 1
    outputs.append(bad_worker.output())
    for url in (bad_url, bad_url.replace("amqp://", "amqps://").replace(
            str(node.port), str(locked.tls_port))):
        with Brama(url, prefix=prefix) as c, pytest.raises(BramaError) as info:
            c.register("x")
        exc: BaseException | None = info.value
        while exc is not None:
            outputs += [str(exc), repr(exc)]
            exc = exc.__cause__ or exc.__context__
        outputs.append(repr(c.transport))
    outputs.append(repr(Settings.from_env({}, broker_url=bad_url)))
    assert "reconnect" in caplog.text  # the client's own link saw the cut too
    outputs.append(caplog.text)
    text = "\n".join(outputs)
    assert len(text) > 1000 and "s1" in text
    for secret in (good, wrong):
        assert secret not in text


def test_permission_layout_is_what_the_docs_show() -> None:
    """docs/operations.md gives the layout this module tests, for the default prefix."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    for role, regexes in permission_layout("brama").items():
        for regex in regexes:
            assert f"`{regex}`" in doc, (role, regex)
