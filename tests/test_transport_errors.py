"""How kombu/py-amqp errors map to brama_mq's classes: the class decides whether the
owner keeps retrying (BrokerUnavailableError) or stops with a message (the rest)."""

from __future__ import annotations

import pytest
from amqp import exceptions as amqp_exc

from brama_mq.errors import (
    AccessRefusedError,
    BrokerStartingError,
    BrokerUnavailableError,
    TransportError,
)
from brama_mq.transport.errors import map_error

URL = "amqp://user:s3cret@127.0.0.1:5672//"

CASES = [
    ("refused socket", ConnectionRefusedError(111, "Connection refused"), BrokerUnavailableError),
    ("reset", ConnectionResetError(104, "reset by peer"), BrokerUnavailableError),
    ("eof", EOFError(), BrokerUnavailableError),
    ("forced close", amqp_exc.ConnectionForced("shutdown"), BrokerUnavailableError),
    # a restarting node answers 404 for a durable queue or stream whose home is not up yet
    ("queue home node down",
     amqp_exc.NotFound("Queue.declare: (404) NOT_FOUND - home node 'rabbit@x' of durable "
                       "queue 'p.journal' in vhost '/' is down or inaccessible"),
     BrokerStartingError),
    ("queue really missing", amqp_exc.NotFound("NOT_FOUND - no queue 'p.owner' in vhost '/'"),
     TransportError),
    ("login refused", amqp_exc.AccessRefused("ACCESS_REFUSED - Login was refused"),
     TransportError),
    ("permission", amqp_exc.AccessRefused("ACCESS_REFUSED - access to queue 'x' refused"),
     AccessRefusedError),
]


@pytest.mark.parametrize(("label", "exc", "kind"), CASES, ids=[c[0] for c in CASES])
def test_error_classes(label: str, exc: BaseException, kind: type[TransportError]) -> None:
    """Each cause maps to exactly the class the retry logic expects; the password never
    appears in the message."""
    mapped = map_error(exc, "connect", URL)
    assert type(mapped) is kind, (label, type(mapped), mapped)
    assert "s3cret" not in str(mapped)


def test_a_queue_whose_home_node_is_down_names_the_migration() -> None:
    """The 404 of a queue whose home node is down is worth retrying (a restarting node), and
    its message names the lasting cause on a cluster: a legacy classic queue, and where the
    migration step is documented."""
    exc = amqp_exc.NotFound("Queue.declare: (404) NOT_FOUND - home node 'rabbit@c1' of durable "
                            "queue 'p.dead' in vhost '/' is down or inaccessible")
    mapped = map_error(exc, "declare", URL)
    assert isinstance(mapped, BrokerStartingError)
    assert "'p.dead'" in str(mapped) and "classic queue" in str(mapped)
    assert "Migrating classic queues" in str(mapped)
