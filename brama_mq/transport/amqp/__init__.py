"""RabbitMQ transport: kombu for connecting, py-amqp channels on the hot path.

kombu.Connection parses the URL, applies SSL options and cycles failover hosts; once
connected, links talk to the underlying py-amqp connection directly, because kombu's
``Producer.publish`` costs several times more per message than ``basic_publish``
(PERFORMANCE_NOTES.md).

One role per module, lowest first: :mod:`.framing` (frames on bytes), :mod:`.messages`
(py-amqp messages to and from brama_mq's types), :mod:`.confirms` (publisher confirms),
:mod:`.endpoint` (what links need of their transport), :mod:`.link` (a connection's
life and its one recovery loop), the link roles :mod:`.owner_link`, :mod:`.client_link`,
:mod:`.event_source`, :mod:`.stream_reader`, and the factory :mod:`.transport`.

Design points, each learned the hard way:

* Confirms are streamed: the critical channel is in confirm mode, publishes are counted
  from 1 and ``basic_ack``/``basic_nack`` events settle them, one or many at a time.
  Transient publishes go on another channel so they never join that sequence.
* Consumer callbacks only append to a deque. Publishing or waiting inside a callback
  recurses (py-amqp drains frames inside ``basic_publish``) or stalls the connection.
* After a lost connection the broker redelivers unacked messages, so delivery tags
  carry a channel *epoch* (see :func:`~brama_mq.transport.base.encode_tag`) and acks of
  older tags are dropped; unconfirmed critical publishes are republished.
* Every kombu/amqp/socket error leaving this package is a brama_mq TransportError with
  the cause kept; URLs in messages and logs are masked.
"""

from brama_mq.transport.amqp.client_link import AmqpClientLink
from brama_mq.transport.amqp.event_source import AmqpEventSource
from brama_mq.transport.amqp.owner_link import AmqpOwnerLink
from brama_mq.transport.amqp.stream_reader import AmqpStreamReader
from brama_mq.transport.amqp.transport import AmqpTransport

__all__ = [
    "AmqpClientLink",
    "AmqpEventSource",
    "AmqpOwnerLink",
    "AmqpStreamReader",
    "AmqpTransport",
]
