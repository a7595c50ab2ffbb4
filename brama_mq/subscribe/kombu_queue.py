"""``brama_mq.kombu_queue()``: a subscription's filter and options checked as
``subscribe()`` checks them, handed to the transport for the ``kombu.Queue`` (this
package never imports kombu itself)."""

from __future__ import annotations

from typing import Any

from brama_mq.settings import Settings
from brama_mq.subscribe.filters import FilterValues, filter_keys
from brama_mq.transport import Topology


def kombu_queue(
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    *,
    name: str | None = None,
    patterns: FilterValues = None,
    quorum: bool | None = None,
    max_deliveries: int = 5,
    queue_length: int = 10_000,
    prefix: str | None = None,
) -> Any:
    """A ``kombu.Queue`` with exactly the bindings ``subscribe()`` would make.

    For your own ``kombu.mixins.ConsumerMixin``: the filter (``events``, ``connection``,
    ``scope``, ``patterns``) becomes the same topic bindings on ``{prefix}.events``. With
    ``name`` it is the named subscription's durable queue ``{prefix}.sub.<name>`` (a
    quorum queue unless ``quorum=False``; declaring it also declares
    ``{prefix}.sub.<name>.dead``, where the broker dead-letters a message rejected or
    delivered more than ``max_deliveries`` times), so a ``subscribe(name=...)`` elsewhere
    competes for the same events. Without ``name`` it is an exclusive, server-named
    queue holding at most ``queue_length`` events. Message bodies are events as
    docs/protocol.md describes; ``brama_mq.protocol.decode_event(body, content_type)``
    parses one.
    """
    from brama_mq.subscribe import _options  # the one place subscription options are checked
    from brama_mq.transport.amqp.kombu_queue import subscription_kombu_queue

    keys = filter_keys(events, connection, scope, patterns)
    options = _options(None, name, 1, 1.0, 1, quorum, 1, queue_length, max_deliveries, 0.0,
                       0, asynchronous=False)
    topology = Topology(prefix or Settings.from_env().prefix)
    return subscription_kombu_queue(
        topology, keys, name=options.name, quorum=options.quorum,
        max_deliveries=options.max_deliveries, queue_length=options.queue_length,
    )
