"""The event source assembles ``basic.deliver`` frames itself (see AmqpEventSource): its
Deliveries must be what py-amqp's own consumer path gives, for every kind of message."""

from __future__ import annotations

import dataclasses
import threading
import time

import amqp
import pytest

from brama_mq.transport.amqp import AmqpTransport
from brama_mq.transport.amqp import framing as amqp_mod
from brama_mq.transport.amqp.messages import to_delivery
from brama_mq.transport.base import Delivery

pytestmark = pytest.mark.broker


def _messages(frame_max: int) -> list[tuple[str, amqp.Message]]:
    """Messages of every shape: plain event, no properties, headers, reply/correlation,
    a content encoding, an empty body, and bodies over one frame (several body frames)."""
    big = b'{"x":"' + b"y" * (3 * frame_max) + b'"}'
    return [
        ("s.c.failure", amqp.Message(b'{"a":1}', content_type="application/json",
                                     delivery_mode=2, message_id="m1")),
        ("s.c.success", amqp.Message(b"raw")),
        ("s.c.state_change", amqp.Message(
            b"{}", application_headers={"x-brama-error": "boom", "n": 3},
            content_type="application/json")),
        ("s.d.failure", amqp.Message(b"{}", reply_to="r", correlation_id="c",
                                     priority=3, expiration="60000", type="t")),
        ("s.d.success", amqp.Message("é".encode("latin-1"), content_encoding="latin-1")),
        ("s.é.failure", amqp.Message(b"")),
        ("s.e.failure", amqp.Message(big, content_type="application/json")),
    ]


def _comparable(d: Delivery) -> dict[str, object]:
    out = dataclasses.asdict(d)
    del out["delivery_tag"], out["epoch"]
    return out


def test_own_delivery_assembly_matches_py_amqp(amqp_transport: AmqpTransport,
                                               broker_url: str) -> None:
    """Every field of a Delivery the event source assembled equals what to_delivery makes
    of py-amqp's message for the same publish (a second queue, same bindings), including
    multi-frame bodies, headers and content encodings; and a bind (py-amqp waiting for
    bind-ok) while deliveries stream in loses or garbles none."""
    assert amqp_mod.OWN_DELIVER, "the own basic.deliver parsing is disabled"
    t = amqp_transport
    t.declare()
    source = t.event_source(prefetch=1000)
    source.bind(["s.#"])
    assert source._consume_id != -1  # the own path is in use (plain TCP)
    conn = amqp.Connection(broker_url.split("//", 1)[1].split("@")[1].rstrip("/"),
                           userid="guest", password="guest")
    conn.connect()
    try:
        ch = conn.channel()
        ref = ch.queue_declare("", exclusive=True).queue
        ch.queue_bind(ref, t.topology.events_exchange, "s.#")
        messages = _messages(source._conn.frame_max)
        for key, msg in messages:
            ch.basic_publish(msg, t.topology.events_exchange, key)
        theirs: list[Delivery] = []
        while len(theirs) < len(messages):
            got = ch.basic_get(ref, no_ack=True)
            if got is None:
                time.sleep(0.01)
                continue
            theirs.append(to_delivery(got, 1))
        ours: list[Delivery] = []
        end = time.monotonic() + 10
        while len(ours) < len(messages) and time.monotonic() < end:
            ours += source.get(0.5)
        assert [_comparable(d) for d in ours] == [_comparable(d) for d in theirs]
        assert all(type(d) is Delivery for d in ours)

        # Deliveries arriving while py-amqp waits for bind-ok go through the same path.
        stop = threading.Event()

        def flood() -> None:
            pub = amqp.Connection(conn.host, userid="guest", password="guest")
            pub.connect()
            pch = pub.channel()
            i = 0
            while not stop.is_set():
                pch.basic_publish(amqp.Message(b'{"i":%d}' % i), t.topology.events_exchange,
                                  "s.f.failure")
                i += 1
            pch.basic_publish(amqp.Message(b"end"), t.topology.events_exchange, "s.f.failure")
            pub.close()

        thread = threading.Thread(target=flood)
        thread.start()
        try:
            for n in range(30):
                source.bind([f"x{n}.#"])
        finally:
            stop.set()
            thread.join()
        bodies: list[bytes] = []
        end = time.monotonic() + 20
        while (not bodies or bodies[-1] != b"end") and time.monotonic() < end:
            got_now = source.get(0.5)
            bodies += [d.body for d in got_now]
            if got_now:
                source.ack(got_now[-1].delivery_tag)
        assert bodies[-1] == b"end"
        assert bodies[:-1] == [b'{"i":%d}' % i for i in range(len(bodies) - 1)]
    finally:
        conn.close()
        source.close()
