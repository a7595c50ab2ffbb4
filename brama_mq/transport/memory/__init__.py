"""In-process transport with RabbitMQ's semantics, for the demo and for users' tests.

Exchanges and queues are Python objects behind one lock; topic routing uses the core's
:class:`~brama_mq.core.matcher.TopicMatcher`, so wildcards behave as on RabbitMQ.
Modelled, because the owner and client rely on them: direct/topic/fanout exchanges and
the default exchange, mandatory returns, single active consumer, prefetch windows,
redelivery of unacked messages when a link closes (dead-lettering past the delivery
limit), direct reply-to, and ``max_length`` with drop-head. Confirms are immediate.
No kombu here.

One role per module, mirroring :mod:`brama_mq.transport.amqp`: :mod:`.broker` (the
exchanges, queues and streams behind the lock), :mod:`.consumer` (taking messages with a
prefetch window, acks, requeue), :mod:`.endpoint` (what links need of their transport),
the link roles :mod:`.owner_link`, :mod:`.client_link`, :mod:`.event_source`,
:mod:`.stream_reader`, and the factory :mod:`.transport`. The names below are imported
from here, as they were when this was one module.
"""

from brama_mq.transport.memory.broker import MemoryBroker, MemoryStream
from brama_mq.transport.memory.broker import _Message as _Message  # tests build raw messages
from brama_mq.transport.memory.client_link import REPLY_PREFIX as REPLY_PREFIX
from brama_mq.transport.memory.client_link import MemoryClientLink
from brama_mq.transport.memory.event_source import MemoryEventSource
from brama_mq.transport.memory.owner_link import MemoryOwnerLink
from brama_mq.transport.memory.stream_reader import MemoryStreamReader
from brama_mq.transport.memory.transport import MemoryTransport

__all__ = [
    "MemoryBroker",
    "MemoryClientLink",
    "MemoryEventSource",
    "MemoryOwnerLink",
    "MemoryStream",
    "MemoryStreamReader",
    "MemoryTransport",
]
