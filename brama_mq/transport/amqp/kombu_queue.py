"""A subscription's queue as a ``kombu.Queue``, for users who run their own kombu
consumer (``ConsumerMixin``) instead of brama_mq's: same name, arguments and bindings
as the queue :func:`brama_mq.subscribe` would declare, so both can share it."""

from collections.abc import Sequence
from typing import Any

from kombu import entity

from brama_mq.transport.topology import Topology, event_queue_arguments

#: kombu's entities carry no complete type hints: used through ``Any`` here, once.
Exchange: Any = entity.Exchange
Queue: Any = entity.Queue
binding: Any = entity.binding


class SubscriptionQueue(Queue):  # type: ignore[misc]  # subclassing an untyped class
    """A ``kombu.Queue`` that declares its dead-letter queue first.

    A named subscription dead-letters to ``{p}.sub.<name>.dead`` through the default
    exchange; were that queue missing, the broker would drop the letter. kombu declares
    queues one by one, so this one declares its dead queue as part of its own declare
    (``dead_queue`` is a kombu attr: copies made by ``bind()`` keep it).
    """

    attrs = (*Queue.attrs, ("dead_queue", None))
    dead_queue: Any
    no_declare: bool | None

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        dead = self.dead_queue
        if dead is not None and not self.no_declare:
            dead.bind(channel or self.channel).declare(nowait=nowait)
        return super().declare(nowait=nowait, channel=channel)


def subscription_kombu_queue(
    topology: Topology,
    keys: Sequence[str],
    *,
    name: str | None,
    quorum: bool,
    max_deliveries: int,
    queue_length: int,
) -> Any:
    """The queue ``subscribe(..., name=name)`` declares, bound with ``keys``."""
    exchange = Exchange(topology.events_exchange, "topic", durable=True, auto_delete=False)
    bindings = [binding(exchange, routing_key=key) for key in keys]
    if name is None:
        # Like the shared transient queue: this process's, server-named, bounded.
        return Queue(
            "", bindings=bindings, exclusive=True, auto_delete=True, durable=False,
            queue_arguments=event_queue_arguments(max_length=queue_length),
        )
    dead_name = topology.subscription_dead_queue(name)
    dead = Queue(dead_name, durable=True, auto_delete=False,
                 queue_arguments=topology.subscription_dead_queue_arguments())
    return SubscriptionQueue(
        topology.subscription_queue(name),
        bindings=bindings,
        durable=True,
        auto_delete=False,
        queue_arguments=event_queue_arguments(
            quorum=quorum,
            dead_letter_queue=dead_name,
            delivery_limit=max_deliveries if quorum else None,
        ),
        dead_queue=dead,
    )
