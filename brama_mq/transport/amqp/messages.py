"""py-amqp messages to and from brama_mq's own types: publishing without py-amqp's
per-message drain, event messages, deliveries."""


import logging
from typing import Any

from amqp import spec
from amqp.basic_message import Message

from brama_mq.transport.base import (
    Delivery,
    Outgoing,
    encode_tag,
)

log = logging.getLogger(__name__)

#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: Properties of a delivery that get their own Delivery field.
OWN_FIELDS = frozenset({"content_type", "application_headers", "reply_to", "correlation_id"})
#: Properties not copied into a dead-lettered copy: the broker refuses a user_id that is
#: not ours, and an expiration would make the evidence disappear.
NOT_COPIED = frozenset({"user_id", "expiration", "delivery_mode", "application_headers"})


def publish(channel: Any, message: Any, exchange: str, routing_key: str, mandatory: bool
             ) -> None:
    """``basic.publish`` without the frame drain py-amqp's ``basic_publish`` does first.

    That drain (a non-blocking read per message, to notice ``connection.blocked``)
    cost 40-60 us of the ~100-150 us per publish measured here; the owner link drains
    anyway in fetch() and wait_confirms(), and a dead socket still fails the write.
    """
    channel.send_method(spec.Basic.Publish, "Bssbb", (0, exchange, routing_key, mandatory, False),
                        message)


def event_message(ev: Outgoing, delivery_mode: int) -> Any:
    return Message(
        ev.body,
        delivery_mode=delivery_mode,
        content_type=ev.content_type,
        message_id=ev.message_id,
        application_headers=ev.headers,
    )


def as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def to_delivery(msg: Any, epoch: int) -> Delivery:
    """A py-amqp message as a transport-neutral Delivery."""
    props: dict[str, Any] = msg.properties
    info: dict[str, Any] = msg.delivery_info
    headers = props.get("application_headers") or {}
    return Delivery(
        body=as_bytes(msg.body),
        delivery_tag=encode_tag(epoch, info["delivery_tag"]),
        content_type=props.get("content_type"),
        headers=dict(headers),
        reply_to=props.get("reply_to"),
        correlation_id=props.get("correlation_id"),
        redelivered=bool(info.get("redelivered")),
        routing_key=info.get("routing_key", ""),
        properties={k: v for k, v in props.items() if k not in OWN_FIELDS},
        epoch=epoch,
        exchange=info.get("exchange", ""),
    )
