"""RabbitMQ transport: kombu for connecting, py-amqp channels on the hot path.

kombu.Connection parses the URL, applies SSL options and cycles failover hosts; once
connected, links talk to the underlying py-amqp connection directly, because kombu's
``Producer.publish`` costs several times more per message than ``basic_publish``
(PERFORMANCE_NOTES.md).

Design points, each learned the hard way:

* Confirms are streamed: the critical channel is in confirm mode, publishes are counted
  from 1 and ``basic_ack``/``basic_nack`` events settle them, one or many at a time.
  Transient publishes go on another channel so they never join that sequence.
* Consumer callbacks only append to a deque. Publishing or waiting inside a callback
  recurses (py-amqp drains frames inside ``basic_publish``) or stalls the connection.
* After a lost connection the broker redelivers unacked messages, so delivery tags
  carry a channel *epoch* (see :func:`~brama_mq.transport.base.encode_tag`) and acks of
  older tags are dropped; unconfirmed critical publishes are republished.
* Every kombu/amqp/socket error leaving this module is a brama_mq TransportError with
  the cause kept; URLs in messages and logs are masked.
"""

from __future__ import annotations

import _socket
import atexit
import contextlib
import errno
import functools
import itertools
import logging
import os
import random
import select
import socket
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import amqp.exceptions as amqp_exc
from amqp import spec
from amqp.basic_message import Message
from amqp.exceptions import MessageNacked, PreconditionFailed
from kombu.connection import Connection as _KombuConnection

from brama_mq.errors import (
    BramaError,
    BrokerUnavailableError,
    ConfirmError,
    OutboxFullError,
    RequestTimeoutError,
    ShardMismatchError,
    TransportError,
)
from brama_mq.transport.base import (
    JSON,
    PING_BODY,
    PING_HEADER,
    Delivery,
    Outgoing,
    StreamStart,
    decode_tag,
    encode_tag,
)
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
    describe,
    is_fatal,
    map_error,
    mask_url,
)
from brama_mq.transport.topology import (
    Topology,
    declare_shard_record,
    declare_topology,
    delete_topology,
    event_queue_arguments,
    kept_queue_warning,
    stored_shards,
)

__all__ = [
    "AmqpClientLink",
    "AmqpEventSource",
    "AmqpOwnerLink",
    "AmqpTransport",
]

log = logging.getLogger(__name__)

_L = TypeVar("_L", bound="_AmqpLink")
_T = TypeVar("_T")
#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.
KombuConnection: Any = _KombuConnection

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: Properties of a delivery that get their own Delivery field.
_OWN_FIELDS = frozenset({"content_type", "application_headers", "reply_to", "correlation_id"})
#: Properties not copied into a dead-lettered copy: the broker refuses a user_id that is
#: not ours, and an expiration would make the evidence disappear.
_NOT_COPIED = frozenset({"user_id", "expiration", "delivery_mode", "application_headers"})


def _publish(channel: Any, message: Any, exchange: str, routing_key: str, mandatory: bool
             ) -> None:
    """``basic.publish`` without the frame drain py-amqp's ``basic_publish`` does first.

    That drain (a non-blocking read per message, to notice ``connection.blocked``)
    cost 40-60 us of the ~100-150 us per publish measured here; the owner link drains
    anyway in fetch() and wait_confirms(), and a dead socket still fails the write.
    """
    channel.send_method(spec.Basic.Publish, "Bssbb", (0, exchange, routing_key, mandatory, False),
                        message)


def _event_message(ev: Outgoing, delivery_mode: int) -> Any:
    return Message(
        ev.body,
        delivery_mode=delivery_mode,
        content_type=ev.content_type,
        message_id=ev.message_id,
        application_headers=ev.headers,
    )


# -- batched framing of event publishes ------------------------------------------------
# The owner publishes up to three events per command. py-amqp frames each publish with
# several pack() calls and writes it with its own sendall(); under load that syscall (it
# wakes the broker each time) was the largest single cost of the owner's loop. Events are
# framed here instead and written in a few large writes. The bytes are exactly what
# py-amqp would send: _framing_matches() compares both at import time and the owner link
# falls back to py-amqp's framing if they ever differ.
_FRAME_HEADER = struct.Struct(">BHI")
#: A method frame's type, channel and size, then basic.publish's class and method ids and
#: the reserved short before the exchange name.
_METHOD_HEAD = struct.Struct(">BHIHHH")
#: The publish's mandatory/immediate bits and the method frame's end octet, then the
#: header frame's type, channel and size, and its class, weight and body size.
_HEADER_HEAD = struct.Struct(">BBBHIHHQ")
#: The header frame's end octet, then the body frame's type, channel and size.
_BODY_HEAD = struct.Struct(">BBHI")
#: What py-amqp adds to a message's size when it decides whether it fits one frame buffer
#: (amqp.method_framing.FRAME_OVERHEAD); bigger messages take its multi-frame path.
_FRAME_OVERHEAD = 40
#: basic.ack (class 60, method 80): its signature and arguments (delivery tag, bits).
_BASIC_ACK_SIG = (60, 80)
_BASIC_ACK = struct.pack(">HH", *_BASIC_ACK_SIG)
_ACK_ARGS = struct.Struct(">QB")
#: basic.deliver (class 60, method 60); its delivery tag and bits follow the consumer tag.
_BASIC_DELIVER = struct.pack(">HH", 60, 60)
_DELIVER_TAG = struct.Struct(">QB")
_BODY_SIZE = struct.Struct(">Q")
#: Flush the framed events to the socket at about this size.
_WRITE_CHUNK = 32 * 1024
_PROPS_CACHE: dict[tuple[str | None, int], bytes | None] = {}


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")  # as py-amqp's str_to_bytes


def _shortstr(value: str) -> bytes | None:
    raw = _utf8(value)
    if len(raw) > 255:
        return None  # py-amqp's framing raises the proper error
    return bytes((len(raw),)) + raw


def _props_prefix(content_type: str | None, delivery_mode: int) -> bytes | None:
    """Property flags, content type and delivery mode of an event (its message_id
    follows), as py-amqp serialises them; None if py-amqp must do it."""
    key = (content_type, delivery_mode)
    try:
        return _PROPS_CACHE[key]
    except KeyError:
        pass
    flags = 0x1000 | 0x0080  # delivery_mode, message_id
    ct = b""
    prefix: bytes | None = None
    if content_type is not None:
        ct = _shortstr(content_type) or b""
        flags |= 0x8000
    if ct or content_type is None:
        prefix = struct.pack(">H", flags) + ct + bytes((delivery_mode,))
    if len(_PROPS_CACHE) < 64:
        _PROPS_CACHE[key] = prefix
    return prefix


def _frame_publish(
    parts: list[bytes],
    channel_id: int,
    exchange: bytes,
    ev: Outgoing,
    delivery_mode: int,
    mandatory: bool,
    frame_max: int,
) -> int:
    """Append the method, header and body frames of one ``basic.publish`` to ``parts``
    and return their size; 0 (nothing appended) when py-amqp must frame it: headers, a
    body that needs several frames, over-long strings. ``exchange``: a short string."""
    if ev.headers is not None:
        return 0
    prefix = _props_prefix(ev.content_type, delivery_mode)
    key = _utf8(ev.routing_key)
    mid = _utf8(ev.message_id)
    if prefix is None or len(key) > 255 or len(mid) > 255:
        return 0
    body = ev.body
    size = len(body)
    mlen = 8 + len(exchange) + len(key)
    hlen = 13 + len(prefix) + len(mid)
    if mlen - 4 + hlen - 12 + size + _FRAME_OVERHEAD > frame_max - 8:
        return 0
    parts += (
        _METHOD_HEAD.pack(1, channel_id, mlen, 60, 40, 0),
        exchange,
        bytes((len(key),)),
        key,
        _HEADER_HEAD.pack(mandatory, 0xCE, 2, channel_id, hlen, 60, 0, size),
        prefix,
        bytes((len(mid),)),
        mid,
    )
    if not size:
        parts.append(b"\xce")
        return 16 + mlen + hlen
    parts += (_BODY_HEAD.pack(0xCE, 3, channel_id, size), body, b"\xce")
    return 24 + mlen + hlen + size


def _framing_matches() -> bool:
    """Whether :func:`_frame_publish` writes what py-amqp's frame writer writes."""
    try:
        from types import SimpleNamespace

        from amqp.method_framing import frame_writer
        from amqp.serialization import dumps

        written: list[bytes] = []
        fake_conn = SimpleNamespace(frame_max=131072, bytes_sent=0)
        fake_transport = SimpleNamespace(write=lambda data: written.append(bytes(data)))
        write = frame_writer(fake_conn, fake_transport)
        samples = [
            (Outgoing("s.c%C3.state_change", b'{"a":"\xc3\xa9"}', True, "ab12-0001"), 2, True),
            (Outgoing("_.x.failure", b"{}", False, "id"), 1, False),
            (Outgoing("_.x.failure", b"", False, "id", content_type=None), 1, False),
        ]
        for ev, mode, mandatory in samples:
            written.clear()
            args = dumps("Bssbb", (0, "ex.events", ev.routing_key, mandatory, False))
            write(1, 7, spec.Basic.Publish, args, _event_message(ev, mode))
            ours: list[bytes] = []
            size = _frame_publish(ours, 7, b"\x09ex.events", ev, mode, mandatory, 131072)
            if not size or size != len(b"".join(ours)) or b"".join(written) != b"".join(ours):
                return False
        return True
    except Exception:  # any surprise: keep py-amqp's framing
        log.debug("batched framing disabled", exc_info=True)
        return False


_BATCHED_FRAMING = _framing_matches()
_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)
#: errno values py-amqp does not treat as a dead connection (amqp.transport._UNAVAIL).
_UNAVAIL = frozenset({errno.EAGAIN, errno.EINTR, errno.ENOENT, errno.EWOULDBLOCK})


class _FrameReader:
    """Buffered ``read_frame`` for py-amqp's plain TCP transport (the owner link's).

    py-amqp reads every frame with three ``recv`` calls sized to it (header, payload,
    end octet) and switches the socket's timeout twice per frame; the owner receives
    three frames per command and a confirm per event. This reads up to 64 KiB at a time
    and cuts frames out of that buffer, with py-amqp's results and errors; the link's
    non-blocking drain takes complete frames from it without touching the socket.
    """

    __slots__ = ("buf", "pos", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.buf: bytes = bytes(transport._read_buffer)  # whatever py-amqp read ahead
        transport._read_buffer = b""
        self.pos = 0

    def frame(self) -> tuple[int, int, bytes] | None:
        """The next complete frame already buffered, or None."""
        buf, pos = self.buf, self.pos
        if len(buf) - pos < 8:
            return None
        frame_type, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
        end = pos + 7 + size
        if end >= len(buf):
            return None
        if buf[end] != 0xCE:
            from amqp.exceptions import UnexpectedFrame

            raise UnexpectedFrame(f"Received frame_end {buf[end]:#04x} while expecting 0xce")
        self.pos = end + 1
        return frame_type, channel, buf[pos + 7 : end]

    def read_frame(self, *_: Any) -> tuple[int, int, bytes]:
        """Drop-in for ``transport.read_frame``: blocks as the socket's timeout says."""
        while True:
            frame = self.frame()
            if frame is not None:
                return frame
            self._add(self._recv(0))

    def fill_nowait(self) -> bool:
        """Add what the kernel has without waiting: True if it had something, else False."""
        sock = self.transport.sock
        if sock is None:
            raise OSError("socket closed")
        if not _DONTWAIT or sock.gettimeout() is not None:
            # No MSG_DONTWAIT, or a timeout set: ask first, then read what is there.
            if not select.select([sock], [], [], 0)[0]:
                return False
            self._add(self._recv(0))
            return True
        try:
            data = self._recv(_DONTWAIT)
        except (BlockingIOError, TimeoutError):
            return False
        self._add(data)
        return True

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the socket to become readable (or fail)."""
        sock = self.transport.sock
        if sock is None:
            raise OSError("socket closed")
        select.select([sock], [], [], timeout)

    def _recv(self, flags: int) -> bytes:
        transport = self.transport
        while True:
            try:
                data: bytes = transport.sock.recv(65536, flags)
            except InterruptedError:
                continue
            except BlockingIOError:
                if flags:
                    raise
                raise TimeoutError() from None  # what py-amqp raises on a non-blocking read
            except TimeoutError:
                raise
            except OSError as exc:
                if exc.errno not in _UNAVAIL:
                    transport.connected = False
                raise
            if not data:
                transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            return data

    def _add(self, data: bytes) -> None:
        self.buf = self.buf[self.pos :] + data if self.pos < len(self.buf) else data
        self.pos = 0


class _DeliverAssembler:
    """A basic.deliver put together from its method, header and body frames, as py-amqp's
    frame handler would, for the links that read their consume channel themselves."""

    __slots__ = ("_args", "_chunks", "_properties", "_received", "_size")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget a delivery half-received on a connection that is gone."""
        self._args: tuple[str, int, bool, str, str] | None = None
        self._properties: dict[str, Any] | None = None
        self._size = 0
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def busy(self) -> bool:
        """Whether a delivery's content frames are still coming."""
        return self._args is not None

    def feed(
        self, frame: tuple[int, int, bytes]
    ) -> tuple[tuple[str, int, bool, str, str], dict[str, Any], Any] | None:
        """Take one frame (the first must be the basic.deliver method frame, checked by
        the caller); ``(args, properties, body)`` once the delivery is complete."""
        frame_type, _, payload = frame
        args = self._args
        body: Any
        if args is None:
            self._args = _deliver_args(payload)
            return None
        if frame_type == 2 and self._properties is None:
            from amqp.serialization import decode_properties_basic

            self._size = _BODY_SIZE.unpack_from(payload, 4)[0]
            self._properties = decode_properties_basic(payload, 12)[0]
            if self._size:
                return None
            body = b""
        elif frame_type == 3 and self._properties is not None:
            chunks = self._chunks
            chunks.append(payload)
            self._received += len(payload)
            if self._received < self._size:
                return None
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        else:
            expected = 2 if self._properties is None else 3
            raise _unexpected(f"Received frame {frame_type} while expecting type: {expected}")
        properties = self._properties
        self.reset()
        return args, properties, body


def _deliver_args(payload: bytes) -> tuple[str, int, bool, str, str]:
    """basic.deliver's arguments (consumer tag, delivery tag, redelivered, exchange,
    routing key) from its method frame, decoded as py-amqp's ``loads("sLbss", ...)``."""
    n = payload[4]
    consumer_tag = payload[5 : 5 + n].decode("utf-8", "surrogatepass")
    offset = 5 + n
    delivery_tag, bits = _DELIVER_TAG.unpack_from(payload, offset)
    offset += 9
    n = payload[offset]
    exchange = payload[offset + 1 : offset + 1 + n].decode("utf-8", "surrogatepass")
    offset += 1 + n
    n = payload[offset]
    routing_key = payload[offset + 1 : offset + 1 + n].decode("utf-8", "surrogatepass")
    return consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key


def _deliver_parsing_matches() -> bool:
    """Whether :func:`_deliver_args` reads what py-amqp reads (checked at import)."""
    try:
        from amqp.serialization import dumps, loads

        for args in (("ctag", 7, True, "ex", "owner.3"), ("é" * 3, 2**40, False, "", "k")):
            payload = _BASIC_DELIVER + dumps("sLbss", args)
            theirs, _ = loads("sLbss", payload, 4)
            if list(_deliver_args(payload)) != list(theirs):
                return False
        return True
    except Exception:
        log.debug("own basic.deliver parsing disabled", exc_info=True)
        return False


_OWN_DELIVER = _deliver_parsing_matches()


def _fan_out(callbacks: Any) -> Callable[[int, bool], None]:
    """One ack callback that calls each of ``callbacks`` (py-amqp keeps a set)."""

    def call_all(tag: int, multiple: bool) -> None:
        for callback in callbacks:
            callback(tag, multiple)

    return call_all


def _drain_frames(
    conn: Any,
    reader: _FrameReader,
    enough: Callable[[], bool],
    *,
    deliver_id: int = -1,
    assembler: _DeliverAssembler | None = None,
    on_deliver: Callable[[Any], None] | None = None,
    confirm: Any = None,
    on_ack: Callable[[int, bool], None] | None = None,
) -> None:
    """Process frames already received, without waiting, until ``enough()``: the links'
    shared frame loop over a :class:`_FrameReader`.

    basic.deliver and its content frames on channel ``deliver_id`` go to ``on_deliver``;
    basic.ack on the ``confirm`` channel (about one per published message) to
    ``on_ack(tag, multiple)`` as py-amqp would dispatch it, unless py-amqp itself waits
    for one; every other frame to py-amqp, in order. Frames handled here are counted as
    py-amqp's frame handler counts them (heartbeats rely on it).
    """
    on_frame = conn.on_inbound_frame
    next_frame = reader.frame
    pending: Any = getattr(confirm, "_pending", None) if on_ack is not None else None
    confirm_id = confirm.channel_id if pending is not None else -1
    while not enough():
        frame = next_frame()
        if frame is None:
            if not reader.fill_nowait():
                return
            continue
        channel = frame[1]
        if channel == deliver_id and (
            assembler.busy or (frame[0] == 1 and frame[2].startswith(_BASIC_DELIVER))  # type: ignore[union-attr]
        ):
            conn.bytes_recv += 1
            on_deliver(frame)  # type: ignore[misc]
            continue
        if (
            channel == confirm_id
            and frame[0] == 1
            and frame[2].startswith(_BASIC_ACK)
            and not confirm.is_closing
            and _BASIC_ACK_SIG not in pending
        ):
            conn.bytes_recv += 1
            tag, bits = _ACK_ARGS.unpack_from(frame[2], 4)
            on_ack(tag, bool(bits & 1))  # type: ignore[misc]
            continue
        on_frame(frame)


class _Inbound:
    """A delivery as the owner link's consumer callback sees it: what py-amqp's Message
    offers to :func:`_to_delivery` (body, properties, delivery_info, channel)."""

    __slots__ = ("body", "channel", "delivery_info", "properties")

    def __init__(
        self, body: Any, channel: Any, delivery_info: dict[str, Any], properties: dict[str, Any]
    ) -> None:
        self.body = body
        self.channel = channel
        self.delivery_info = delivery_info
        self.properties = properties


def _unexpected(message: str) -> Exception:
    from amqp.exceptions import UnexpectedFrame

    error: Exception = UnexpectedFrame(message)
    return error


def _install_reader(conn: Any) -> _FrameReader | None:
    """Give a plain-TCP py-amqp connection a :class:`_FrameReader` (None for others)."""
    from amqp.transport import TCPTransport

    transport: Any = getattr(conn, "transport", None)
    if type(transport) is not TCPTransport:
        return None
    reader = _FrameReader(transport)
    transport.read_frame = reader.read_frame
    return reader


def _backoff(attempt: int, cap: float) -> float:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to ``cap``, times 0.5-1.0."""
    return min(cap, 0.1 * float(2 ** min(attempt, 16))) * random.uniform(0.5, 1.0)


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _to_delivery(msg: Any, epoch: int) -> Delivery:
    """A py-amqp message as a transport-neutral Delivery."""
    props: dict[str, Any] = msg.properties
    info: dict[str, Any] = msg.delivery_info
    headers = props.get("application_headers") or {}
    return Delivery(
        body=_as_bytes(msg.body),
        delivery_tag=encode_tag(epoch, info["delivery_tag"]),
        content_type=props.get("content_type"),
        headers=dict(headers),
        reply_to=props.get("reply_to"),
        correlation_id=props.get("correlation_id"),
        redelivered=bool(info.get("redelivered")),
        routing_key=info.get("routing_key", ""),
        properties={k: v for k, v in props.items() if k not in _OWN_FIELDS},
        epoch=epoch,
        exchange=info.get("exchange", ""),
    )


def _recoverable(exc: BaseException) -> bool:
    """Whether a reconnect may cure ``exc`` (our own errors are never retried here)."""
    return isinstance(exc, RECOVERABLE_ERRORS) and not isinstance(exc, BramaError)


class _Pending:
    """One confirmed publish, kept until the broker acks it (republished otherwise)."""

    __slots__ = (
        "done", "event", "exchange", "mandatory", "message", "returned", "routing_key", "seq"
    )

    def __init__(self, exchange: str, routing_key: str, message: Any, seq: int) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.message = message
        self.mandatory = True
        self.seq = seq
        self.done = False
        self.returned = False
        #: An owner event framed by the link itself: its py-amqp Message is only built
        #: if it has to be republished (see :meth:`AmqpOwnerLink._message`).
        self.event: Outgoing | None = None


class _ConfirmTracker:
    """Streamed publisher confirms for one confirm-mode channel at a time.

    Tags are consecutive from 1 per channel, so a ``multiple`` ack settles the range
    ``[low, tag]``; nacked publishes wait in ``nacked`` to be republished; after a new
    channel :meth:`restart` hands back everything unsettled in publish order.
    """

    def __init__(self) -> None:
        self.next_tag = 1
        self.low = 1
        self.unconfirmed: dict[int, _Pending] = {}
        self.nacked: list[_Pending] = []
        self.seq = 0
        self.settled_since_wait = 0
        self.confirmed = 0
        self.nacks = 0
        # Whether ``unconfirmed`` (in tag order) is also in seq order, so its first entry
        # is the oldest; a republished nack breaks that until everything has settled.
        self._in_order = True
        self._last_seq = 0

    def new(self, exchange: str, routing_key: str, message: Any) -> _Pending:
        self.seq += 1
        return _Pending(exchange, routing_key, message, self.seq)

    def register(self, pending: _Pending) -> int:
        tag = self.next_tag
        self.next_tag = tag + 1
        if pending.seq < self._last_seq:
            self._in_order = False
        else:
            self._last_seq = pending.seq
        self.unconfirmed[tag] = pending
        return tag

    def settled_through(self) -> int:
        """A seq such that every publish numbered up to it is settled (confirmed, or
        handed back by the client link); publishes count from 1, so 0 means none yet."""
        unconfirmed = self.unconfirmed
        low = self.seq + 1
        if unconfirmed:
            if self._in_order:
                low = next(iter(unconfirmed.values())).seq
            else:
                low = min(p.seq for p in unconfirmed.values())
        elif not self._in_order:
            self._in_order = True
        for p in self.nacked:
            low = min(low, p.seq)
        return low - 1

    def _settle(self, tag: int, multiple: bool) -> list[_Pending]:
        if not multiple:
            one = self.unconfirmed.pop(tag, None)
            return [] if one is None else [one]
        out = []
        pop = self.unconfirmed.pop
        for t in range(self.low, tag + 1):
            p = pop(t, None)
            if p is not None:
                out.append(p)
        self.low = max(self.low, tag + 1)
        return out

    def on_ack(self, tag: int, multiple: bool) -> None:
        for p in self._settle(tag, multiple):
            p.done = True
            self.confirmed += 1
            self.settled_since_wait += 1

    def on_nack(self, tag: int, multiple: bool) -> None:
        for p in self._settle(tag, multiple):
            self.nacks += 1
            self.nacked.append(p)

    def defer(self, pending: _Pending) -> None:
        """Keep a publish that could not be sent; it goes out with the next (re)send."""
        self.nacked.append(pending)

    def outstanding(self) -> int:
        return len(self.unconfirmed) + len(self.nacked)

    def take_nacked(self) -> list[_Pending]:
        out, self.nacked = self.nacked, []
        return out

    def restart(self) -> list[_Pending]:
        """Forget tags (a new channel numbers from 1) and return all unsettled, in order."""
        out = sorted([*self.unconfirmed.values(), *self.nacked], key=lambda p: p.seq)
        self.unconfirmed = {}
        self.nacked = []
        self.next_tag = 1
        self.low = 1
        self._in_order = True
        self._last_seq = 0
        return out


class _Connector:
    """One kombu connection, opened once per attempt over every failover host."""

    def __init__(self, transport: AmqpTransport) -> None:
        self._t = transport
        self._kconn: Any = transport._new_kombu_connection()
        self._amqp: Any = None

    def connect(self) -> Any:
        """The py-amqp connection, trying each configured host once (no sleeping)."""
        attempts = max(1, len(getattr(self._kconn, "alt", None) or ()))
        last: BaseException | None = None
        for _ in range(attempts):
            try:
                self._kconn.collect()
                self._kconn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
                # Connected now, so this is the py-amqp connection (no retry inside).
                self._amqp = self._kconn.connection
                return self._amqp
            except RECOVERABLE_ERRORS as exc:
                last = exc
                if is_fatal(exc):
                    raise
                self._kconn.maybe_switch_next()
        assert last is not None
        raise last

    def drop(self) -> None:
        """Forget a dead connection without talking to the broker."""
        try:
            self._kconn.collect()
        except Exception:  # a dead connection may fail in any way while collected
            log.debug("ignoring error while collecting a dead connection", exc_info=True)

    def switch_next(self) -> None:
        """Start the next connect at the next host of the failover list (after a drop:
        the host just left may be frozen, and a connect to it would wait a timeout)."""
        try:
            self._kconn.maybe_switch_next()
        except Exception:  # switching closes what is left of the old connection
            log.debug("ignoring error while switching hosts", exc_info=True)

    @property
    def host(self) -> str:
        """The host (``host:port``) this connector connects to now, for log lines."""
        kconn = self._kconn
        return f"{kconn.hostname}:{kconn.port}"

    def close(self, timeout: float = 5.0) -> None:
        """Close politely (the broker requeues unacked deliveries), waiting at most
        ``timeout`` s for the broker's close-ok."""
        conn, self._amqp = self._amqp, None
        try:
            if conn is not None and conn.connected:
                conn.sock.settimeout(timeout)
            self._kconn.release()
        except Exception:
            log.debug("ignoring error while closing a connection", exc_info=True)
            self.drop()


class _AmqpLink:
    """Connection lifecycle shared by every link: connect, set up, recover, close.

    Subclasses implement :meth:`_setup` (open channels, declare, consume, republish)
    and may implement :meth:`_on_lost` (forget state tied to the dead channel).
    """

    role = "link"

    def __init__(self, transport: AmqpTransport) -> None:
        self._t = transport
        self._connector = _Connector(transport)
        self._conn: Any = None
        self._epoch = 0
        self._closed = False
        self._lost: BaseException | None = None
        self._counters: dict[str, int] = {"reconnects": 0}
        self._max_wait = transport.heartbeat / 4 if transport.heartbeat else 1.0
        self._interrupted = False
        self._open(deadline=None)

    # -- lifecycle -------------------------------------------------------------
    def _setup(self, conn: Any) -> None:
        raise NotImplementedError

    def _on_lost(self) -> None:
        """Forget what belonged to the dead connection (buffers, channels)."""

    def _error(self, exc: BaseException, what: str) -> TransportError:
        return map_error(exc, f"{self.role}: {what}", self._t.url)

    def _open(self, *, deadline: float | None) -> None:
        """Connect and set up, retrying with backoff until ``deadline`` (None: one round)."""
        attempt = 0
        while True:
            try:
                conn = self._connector.connect()
                self._conn = conn
                self._epoch += 1
                self._setup(conn)
                self._lost = None
                if attempt or self._epoch > 1:
                    log.info("%s connected to %s (epoch %d)", self.role,
                             self._connector.host, self._epoch)
                return
            except BramaError:
                self._connector.drop()
                self._conn = None
                raise
            except RECOVERABLE_ERRORS as exc:
                self._connector.drop()
                self._conn = None
                self._on_lost()
                if is_fatal(exc):
                    raise self._error(exc, "connect and declare") from exc
                now = time.monotonic()
                if deadline is None or now >= deadline or self._interrupted:
                    raise self._error(exc, "connect") from exc
                pause = min(_backoff(attempt, self._t.max_backoff), max(0.0, deadline - now))
                log.warning("%s cannot reach %s (%s); retrying in %.2f s", self.role,
                            self._t.masked_url, describe(exc, self._t.url), pause)
                end = now + pause
                while not self._interrupted and (left := end - time.monotonic()) > 0:
                    time.sleep(min(left, 0.1))  # short naps, so interrupt() is noticed
                if self._interrupted:
                    raise self._error(exc, "connect") from exc
                attempt += 1

    def abandon(self, reason: str) -> None:
        """Drop the connection at once, without a close handshake (its node may be frozen
        or cut off), so the broker hands on what this link consumed (an owner queue, its
        unacked deliveries); the next call reconnects, starting at the next host of the
        failover list. For the single-threaded links (owner, stream reader)."""
        if self._closed or self._conn is None:
            return
        log.warning("%s leaves %s: %s", self.role, self._connector.host, reason)
        self._connector.drop()
        self._conn = None
        self._lost = BrokerUnavailableError(reason)
        self._on_lost()

    def interrupt(self) -> None:
        """Stop waiting for the broker: a reconnect in progress, or a later one, raises
        BrokerUnavailableError instead of retrying. Safe to call from a signal handler."""
        self._interrupted = True

    def _recover(self, exc: BaseException) -> None:
        """Replace a dead connection: reconnect with backoff, set up again, republish."""
        if self._closed:
            raise self._error(exc, "use after close") from exc
        log.warning("%s lost its connection to %s (%s); reconnecting", self.role,
                    self._connector.host, describe(exc, self._t.url))
        self._counters["reconnects"] += 1
        self._connector.drop()
        self._connector.switch_next()  # the host just lost may be down or frozen
        self._conn = None
        self._lost = exc
        self._on_lost()
        self._open(deadline=time.monotonic() + self._t.reconnect_timeout)

    def _ensure(self) -> None:
        """Raise if closed; reconnect first if an earlier call lost the connection."""
        if self._closed:
            raise TransportError(f"{self.role} is closed")
        if self._conn is None or self._lost is not None:
            self._recover(self._lost or BrokerUnavailableError("not connected"))

    def _tick(self) -> None:
        """Send heartbeats when due; raises ConnectionForced if the broker went silent."""
        self._conn.heartbeat_tick()

    def _drain_until(self, deadline: float, done: Callable[[], bool]) -> None:
        """Process incoming frames until ``done()`` or the deadline (socket.timeout-free)."""
        conn = self._conn
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=min(remaining, self._max_wait))
            self._tick()

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting, until ``enough()``."""
        conn = self._conn
        while not enough():
            try:
                conn.drain_events(timeout=0)
            except TimeoutError:
                return

    def close(self) -> None:
        """Close the connection; the broker requeues unacknowledged deliveries."""
        if self._closed:
            return
        self._closed = True
        self._connector.close()
        self._conn = None
        self._t._forget(self)


class _ConsumerMixin:
    """Buffered consumption: the callback only appends; fetch drains and converts."""

    _buffer: deque[Any]
    _cancelled: bool

    def _on_delivery(self, msg: Any) -> None:
        self._buffer.append(msg)

    def _on_cancel(self, consumer_tag: str) -> None:
        # The queue was deleted under us: reconnect and declare it again.
        self._cancelled = True


class AmqpOwnerLink(_ConsumerMixin, _AmqpLink):
    """The state owner's link: consume commands, publish events, confirm, ack.

    Three channels on one connection: *consume* (QoS per consumer, since quorum queues
    refuse global QoS), *plain* (RPC replies) and *confirm* (every event and dead letter:
    one channel keeps each connection's events in ``seq`` order on the wire; transient
    ones take a confirm tag that nobody waits for). Used from one thread.
    """

    role = "owner link"
    #: After a reconnect, publish again what the broker had not confirmed (events, dead
    #: letters, journal records). A journaled owner turns this off: it steps down on a new
    #: connection and whoever takes over republishes from the journal, so a superseded
    #: owner's unconfirmed batch never reaches subscribers late, after a newer owner's.
    republish_on_reconnect = True

    def __init__(self, transport: AmqpTransport, *, prefetch: int, shard: int | None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, not {prefetch}")
        self._prefetch = prefetch
        self._queue = transport.topology.owner_queue(shard)
        self._buffer = deque()
        self._cancelled = False
        self._tracker = _ConfirmTracker()
        # Confirmed pings not yet seen confirmed, and the mark of the newest that was.
        self._pings: deque[_Pending] = deque(maxlen=64)
        self._pinged_through = 0
        self._plain: Any = None
        self._confirm: Any = None
        self._consume: Any = None
        self._reader: _FrameReader | None = None
        self._assembler = _DeliverAssembler()
        self._handed = 0
        self._stats = {
            "published": 0,
            "transient": 0,
            "returned": 0,
            "republished": 0,
            "delivered": 0,
            "stale_acks": 0,
            "replies": 0,
            "dead_lettered": 0,
            "appended": 0,
            "discarded": 0,
        }
        self._owner_key = transport.topology.owner_key(shard)
        super().__init__(transport)

    @property
    def queue(self) -> str:
        """The owner queue this link consumes."""
        return self._queue

    @property
    def epoch(self) -> int:
        """Number of the current connection (1 for the first, +1 per reconnect)."""
        return self._epoch

    def _setup(self, conn: Any) -> None:
        plain = conn.channel()
        self._t._declare_on(plain)
        confirm = conn.channel()
        confirm.confirm_select()
        confirm.events["basic_ack"].add(self._tracker.on_ack)
        confirm.events["basic_nack"].add(self._tracker.on_nack)
        confirm.events["basic_return"].add(self._on_return)
        consume = conn.channel()
        consume.basic_qos(prefetch_size=0, prefetch_count=self._prefetch, a_global=False)
        self._buffer.clear()
        self._cancelled = False
        consume.basic_consume(
            self._queue, callback=self._on_delivery, on_cancel=self._on_cancel
        )
        self._plain, self._confirm, self._consume = plain, confirm, consume
        self._reader = _install_reader(conn)
        self._assembler.reset()
        unsettled = self._tracker.restart()
        if not self.republish_on_reconnect:
            self._stats["discarded"] += len(unsettled)
            return
        for pending in unsettled:
            self._send_pending(pending)
            self._stats["republished"] += 1

    def _on_lost(self) -> None:
        self._buffer.clear()
        self._plain = self._confirm = self._consume = None
        self._reader = None
        self._assembler.reset()

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received without waiting, until ``enough()``.

        Complete frames are taken from the buffered reader and the socket is read with
        ``MSG_DONTWAIT``, so no timeout is switched per frame (see :class:`_FrameReader`).
        Every frame of this connection goes through here once the reader is installed
        (:meth:`_drain_until` waits with select, replies skip py-amqp's drain), so the
        deliveries taken over by :meth:`_on_consume_frame` never reach py-amqp half-read.
        """
        reader = self._reader
        if reader is None:
            super()._drain_nowait(enough)
            return
        confirm = self._confirm
        on_ack = None
        if confirm is not None:  # a basic.ack goes where py-amqp would dispatch it
            callbacks = confirm.events["basic_ack"]
            on_ack = next(iter(callbacks)) if len(callbacks) == 1 else _fan_out(callbacks)
        consume = self._consume
        _drain_frames(
            self._conn, reader, enough,
            deliver_id=consume.channel_id if consume is not None and _OWN_DELIVER else -1,
            assembler=self._assembler, on_deliver=self._on_consume_frame,
            confirm=confirm, on_ack=on_ack,
        )

    def _drain_until(self, deadline: float, done: Callable[[], bool]) -> None:
        """Like the base class, but every frame goes through :meth:`_drain_nowait`: it
        waits for the socket with select and reads without waiting."""
        reader = self._reader
        if reader is None:
            super()._drain_until(deadline, done)
            return
        while not done():
            self._drain_nowait(done)
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            reader.wait(min(remaining, self._max_wait))
            self._tick()

    def _on_consume_frame(self, frame: tuple[int, int, bytes]) -> None:
        """A frame of a basic.deliver on the consume channel, assembled and handed to the
        consumer callback as py-amqp's frame handler and Channel would, without them."""
        done = self._assembler.feed(frame)
        if done is None:
            return
        (consumer_tag, delivery_tag, redelivered, exchange, routing_key), properties, body = done
        consume = self._consume
        if consume.is_closing:
            return  # py-amqp ignores what arrives on a closing channel
        if consume.auto_decode and "content_encoding" in properties:
            with contextlib.suppress(Exception):  # as py-amqp: keep the bytes if it fails
                body = body.decode(properties["content_encoding"])
        info = {
            "consumer_tag": consumer_tag,
            "delivery_tag": delivery_tag,
            "redelivered": redelivered,
            "exchange": exchange,
            "routing_key": routing_key,
        }
        callback = consume.callbacks.get(consumer_tag)
        if callback is None:  # as py-amqp: nobody consumes with that tag
            log.warning("rejecting delivery %s for unknown consumer %r", delivery_tag,
                        consumer_tag)
            consume.basic_reject(delivery_tag, requeue=True)
            return
        callback(_Inbound(body, consume, info, properties))

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        # Unroutable (nobody bound): counted, not retried; its ack follows. Events with
        # no subscriber are normal; a dead letter with no dead queue loses evidence.
        self._stats["returned"] += 1
        if exchange == self._t.topology.dead_exchange:
            log.warning("dead letter returned: nothing is bound to %s (was %s deleted?)",
                        exchange, self._t.topology.dead_queue)

    def _send_pending(self, pending: _Pending) -> None:
        self._tracker.register(pending)
        _publish(self._confirm, self._message(pending), pending.exchange, pending.routing_key,
                 True)

    @staticmethod
    def _message(pending: _Pending) -> Any:
        if pending.message is None:
            assert pending.event is not None
            pending.message = _event_message(pending.event, 2)
        return pending.message

    # -- pipelined confirms --------------------------------------------------------
    def confirm_mark(self) -> int:
        """A number for "every critical publish and dead letter handed over so far"."""
        return self._tracker.seq

    def confirmed_mark(self) -> int:
        """The highest mark (see :meth:`confirm_mark`) whose publishes are all confirmed.

        Never blocks; nacked publishes are republished first, as wait_confirms does.
        """
        tracker = self._tracker
        if tracker.nacked and self._confirm is not None and self._lost is None:
            try:
                for pending in tracker.take_nacked():
                    self._send_pending(pending)
                    self._stats["republished"] += 1
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                self._lost = exc  # the next call reconnects (and republishes)
        return tracker.settled_through()

    def proven_mark(self) -> int:
        """Like :meth:`confirmed_mark`, but also the mark of the newest confirmed ping even
        while older publishes wait: the owner queue's leader took that ping from this
        channel, a round trip the lease can count although a stream electing a new leader
        holds the journal's confirms back (the lease only needs *when* the broker last
        answered, not that everything before it is safe)."""
        pings = self._pings
        for ping in pings:  # a few at most: one goes out per quarter lease
            if ping.done and ping.seq > self._pinged_through:
                self._pinged_through = ping.seq
        while pings and pings[0].done:
            pings.popleft()
        return max(self.confirmed_mark(), self._pinged_through)

    # -- consuming ---------------------------------------------------------------
    def fetch(
        self, max_messages: int, timeout: float, until: Callable[[], bool] | None = None
    ) -> list[Delivery]:
        """Wait up to ``timeout`` s for a delivery, then return what is buffered.

        ``until``: also stop waiting (returning what is buffered, maybe nothing) as soon
        as it returns True; checked while frames are processed, e.g. as confirms arrive.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        deadline = time.monotonic() + max(0.0, timeout)
        buffer = self._buffer
        if until is None:
            def ready() -> bool:
                return bool(buffer) or self._cancelled
        else:
            def ready() -> bool:
                return bool(buffer) or self._cancelled or until()
        while True:
            self._ensure()
            try:
                if self._cancelled:
                    raise BrokerUnavailableError("consumer cancelled by the broker")
                if not buffer:
                    self._drain_until(deadline, ready)
                if buffer:
                    self._drain_nowait(lambda: len(buffer) >= max_messages)
                if self._cancelled and not buffer:
                    raise BrokerUnavailableError("consumer cancelled by the broker")
                break
            except BramaError as exc:
                if not isinstance(exc, BrokerUnavailableError) or self._closed:
                    raise
                self._recover(exc)
            except RECOVERABLE_ERRORS as exc:
                self._recover(exc)
            if time.monotonic() >= deadline or (until is not None and until()):
                break
        n = min(max_messages, len(buffer))
        epoch = self._epoch
        out = [_to_delivery(buffer.popleft(), epoch) for _ in range(n)]
        self._stats["delivered"] += n
        return out

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Ack up to ``delivery_tag``; tags from an earlier connection are ignored."""
        epoch, tag = decode_tag(delivery_tag)
        if epoch != self._epoch or self._consume is None or self._lost is not None:
            self._stats["stale_acks"] += 1
            return
        try:
            self._consume.basic_ack(tag, multiple=multiple)
        except RECOVERABLE_ERRORS as exc:
            if not _recoverable(exc):
                raise
            # The ack is lost with the connection; the broker will redeliver.
            self._stats["stale_acks"] += 1
            self._recover(exc)

    # -- publishing --------------------------------------------------------------
    def publish(self, events: Sequence[Outgoing]) -> None:
        """Send events: transient at once, critical pipelined on the confirm channel.

        A critical event handed over here is never dropped by the link: if the broker
        stays away past ``reconnect_timeout`` the BrokerUnavailableError leaves the rest
        pending, and they go out when a later call reconnects. Transient ones are lost.
        """
        i, n = 0, len(events)
        exchange = self._t.topology.events_exchange
        tracker = self._tracker
        try:
            while i < n:
                self._ensure()
                self._handed = i
                try:
                    i = self._send_events(events, i, exchange)
                except BramaError:
                    raise
                except RECOVERABLE_ERRORS as exc:
                    # Critical events up to here are pending: the recovery republishes
                    # them. Transient ones that were in the failed write are lost.
                    i = self._handed
                    self._recover(exc)
        except BramaError:
            for ev in events[i:]:
                if ev.critical:
                    tracker.defer(tracker.new(exchange, ev.routing_key, _event_message(ev, 2)))
                    self._stats["published"] += 1
            raise

    def _send_events(self, events: Sequence[Outgoing], i: int, exchange: str) -> int:
        """Publish ``events[i:]`` on the confirm channel, framed here and written in few
        writes; returns ``len(events)``. ``self._handed`` tracks how far they were handed
        over (registered as pending if critical), for the caller's recovery.

        Every event goes on the confirm channel, so one connection's events reach a queue
        in seq order; a transient one takes a tag nobody waits for.
        """
        conn = self._conn
        confirm = self._confirm
        tracker = self._tracker
        stats = self._stats
        batched = _BATCHED_FRAMING
        channel_id = confirm.channel_id
        frame_max = conn.frame_max
        exchange_word = _shortstr(exchange) or b""
        parts: list[bytes] = []
        size = 0
        n = len(events)
        for j in range(i, n):
            ev = events[j]
            critical = ev.critical
            framed = (
                _frame_publish(parts, channel_id, exchange_word, ev, 2 if critical else 1,
                               critical, frame_max)
                if batched and exchange_word
                else 0
            )
            if not framed:  # py-amqp frames this one, after what is waiting
                if parts:
                    self._write(conn, parts)
                    parts, size = [], 0
                if critical:
                    pending = tracker.new(exchange, ev.routing_key, _event_message(ev, 2))
                    self._handed = j + 1
                    stats["published"] += 1
                    self._send_pending(pending)
                else:
                    tracker.next_tag += 1
                    self._handed = j + 1
                    stats["transient"] += 1
                    _publish(confirm, _event_message(ev, 1), exchange, ev.routing_key, False)
                continue
            if critical:
                pending = tracker.new(exchange, ev.routing_key, None)
                pending.event = ev
                tracker.register(pending)
                stats["published"] += 1
            else:
                tracker.next_tag += 1
                stats["transient"] += 1
            self._handed = j + 1
            size += framed
            if size >= _WRITE_CHUNK:
                self._write(conn, parts)
                parts, size = [], 0
        if parts:
            self._write(conn, parts)
        return n

    @staticmethod
    def _write(conn: Any, parts: list[bytes]) -> None:
        conn.transport.write(b"".join(parts))
        conn.bytes_sent += 1  # heartbeats: data went out

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy ``delivery`` to the dead exchange with ``x-brama-error``, confirmed."""
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        props = {k: v for k, v in delivery.properties.items() if k not in _NOT_COPIED}
        if delivery.content_type is not None:
            props["content_type"] = delivery.content_type
        if delivery.reply_to is not None:
            props["reply_to"] = delivery.reply_to
        if delivery.correlation_id is not None:
            props["correlation_id"] = delivery.correlation_id
        msg = Message(delivery.body, delivery_mode=2, application_headers=headers, **props)
        pending = self._tracker.new(self._t.topology.dead_exchange, delivery.routing_key, msg)
        self._stats["published"] += 1
        self._stats["dead_lettered"] += 1
        self._send_confirmed(pending)

    def append(self, stream: str, body: bytes) -> None:
        """Publish a journal or snapshot record to ``stream`` (default exchange),
        persistent and confirmed, on the confirm channel: in order with the events."""
        msg = Message(body, delivery_mode=2, content_type=JSON)
        pending = self._tracker.new("", stream, msg)
        self._stats["published"] += 1
        self._stats["appended"] += 1
        self._send_confirmed(pending)

    def _send_confirmed(self, pending: _Pending) -> None:
        """Send a tracked publish now, or keep it for the reconnect that resends it."""
        try:
            self._ensure()
        except BramaError:
            self._tracker.defer(pending)  # sent when a later call reconnects
            raise
        try:
            self._send_pending(pending)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            self._recover(exc)  # republishes it

    def ping(self, confirmed: bool = False) -> None:
        """An empty transient message with PING_HEADER to this link's own owner queue.

        ``confirmed``: on the confirm channel, tracked like a critical publish, so its
        confirm (the quorum queue took it: a majority of its nodes) is a broker round
        trip an owner can count on for its lease (:meth:`confirm_mark`)."""
        msg = Message(PING_BODY, delivery_mode=1, content_type=JSON,
                      application_headers={PING_HEADER: 1})
        topology = self._t.topology
        if confirmed:
            pending = self._tracker.new(topology.commands_exchange, self._owner_key, msg)
            self._pings.append(pending)
            self._send_confirmed(pending)
            return
        self._ensure()
        try:
            _publish(self._plain, msg, topology.commands_exchange, self._owner_key, False)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            self._recover(exc)

    def wait_confirms(self, timeout: float) -> int:
        """Block until every critical publish so far is confirmed; see OwnerLink."""
        deadline = time.monotonic() + max(0.0, timeout)
        tracker = self._tracker
        while True:
            self._ensure()
            try:
                for pending in tracker.take_nacked():
                    self._send_pending(pending)
                    self._stats["republished"] += 1
                if not tracker.outstanding():
                    break
                if time.monotonic() >= deadline:
                    raise ConfirmError(
                        f"{tracker.outstanding()} critical publishes not confirmed within "
                        f"{timeout} s ({self._t.masked_url}); they stay pending"
                    )
                self._drain_until(deadline, lambda: not tracker.unconfirmed or bool(tracker.nacked))
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                self._recover(exc)
        n, tracker.settled_since_wait = tracker.settled_since_wait, 0
        return n

    # -- RPC ---------------------------------------------------------------------
    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer an RPC through direct reply-to (default exchange, key = reply_to)."""
        msg = Message(body, delivery_mode=1, content_type=JSON, correlation_id=correlation_id)
        for attempt in range(2):
            self._ensure()
            try:
                # Not basic_publish: its frame drain would bypass _drain_nowait.
                _publish(self._plain, msg, "", reply_to, False)
                self._stats["replies"] += 1
                return
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                if attempt:
                    raise self._error(exc, "reply") from exc
                self._recover(exc)

    def stats(self) -> dict[str, int]:
        """Counters since the link was made (see the OwnerLink protocol)."""
        out = dict(self._stats)
        out["confirmed"] = self._tracker.confirmed
        out["nacked"] = self._tracker.nacks
        out["pending"] = self._tracker.outstanding()
        out["reconnects"] = self._counters["reconnects"]
        out["epoch"] = self._epoch
        return out


class AmqpEventSource(_ConsumerMixin, _AmqpLink):
    """A subscriber queue on the events exchange; bindings survive reconnects.

    :meth:`get` waits on the socket *and* on a wake-up socket pair, so another thread can
    end the wait (:meth:`wake`) when it needs the owning thread to ack or rebind now,
    instead of waiting for the next message or the end of a poll interval.
    """

    role = "event source"

    def __init__(
        self,
        transport: AmqpTransport,
        *,
        queue: str | None,
        durable: bool,
        max_length: int | None,
        prefetch: int,
        quorum: bool = False,
        dead_letter_queue: str | None = None,
        delivery_limit: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 0:
            raise ValueError("max_length must be >= 0")
        if quorum and (not queue or not durable):
            raise ValueError("a quorum queue must be named and durable")
        self._wanted = queue or ""
        self._durable = durable
        self._max_length = max_length
        self._quorum = quorum
        self._dead_queue = dead_letter_queue
        self._delivery_limit = delivery_limit
        self._prefetch = prefetch
        self._keys: list[str] = []
        self._name = ""
        self._buffer = deque()
        self._cancelled = False
        self._channel: Any = None
        self._confirm: Any = None
        self._returned = False
        self._reader: _FrameReader | None = None
        self._assembler = _DeliverAssembler()
        self._consume_id = -1
        self._consumer_tag = ""
        self._stale_acks = 0
        self._counts = {"delivered": 0, "dead_lettered": 0}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        try:
            super().__init__(transport)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    @property
    def queue(self) -> str:
        """The queue name (a server-named queue gets a new name after a reconnect)."""
        return self._name

    def _arguments(self) -> dict[str, Any]:
        return event_queue_arguments(
            max_length=self._max_length,
            quorum=self._quorum,
            dead_letter_queue=self._dead_queue,
            delivery_limit=self._delivery_limit,
        )

    def _declare_subscription_dead_queue(self, conn: Any, ch: Any, name: str) -> Any:
        """Declare the bounded dead queue; one made unbounded by an earlier version is
        kept as it is (RabbitMQ refuses other arguments), with a warning saying how to
        bound it. Returns the channel to go on with (a refusal closes the channel)."""
        arguments = self._t.topology.subscription_dead_queue_arguments()
        try:
            ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        except PreconditionFailed as exc:
            if name not in str(exc):
                raise
            log.warning("%s (%s)", kept_queue_warning(name, str(exc)),
                        describe(exc, self._t.url))
            if not ch.is_open:  # py-amqp reopens a channel the broker closed
                ch.open()
            ch.queue_declare(name, durable=True, auto_delete=False, passive=True)
        self._t._note("queue", name)
        return ch

    def _setup(self, conn: Any) -> None:
        # Only its own queues: the shared topology is checked passively (a subscriber's
        # permissions need not cover the owner's queues).
        ch = self._t._declare_shared(
            conn, [(self._t.topology.events_exchange, "topic")], [], owner_side=False
        )
        if self._dead_queue is not None:
            ch = self._declare_subscription_dead_queue(conn, ch, self._dead_queue)
        if self._wanted:
            try:
                ok = ch.queue_declare(
                    self._wanted,
                    durable=self._durable,
                    auto_delete=not self._durable,
                    arguments=self._arguments(),
                )
            except PreconditionFailed as exc:
                # A named subscription's queue an earlier version made (e.g. classic):
                # its events are there, so it is used as it is, with the way to migrate.
                if not self._durable or self._wanted not in str(exc):
                    raise
                log.warning("%s (%s)", kept_queue_warning(self._wanted, str(exc)),
                            describe(exc, self._t.url))
                if not ch.is_open:
                    ch.open()
                ok = ch.queue_declare(self._wanted, passive=True)
        else:
            ok = ch.queue_declare(
                "", exclusive=True, auto_delete=True, arguments=self._arguments()
            )
        self._name = ok.queue
        self._t._note("queue", self._name)
        for key in self._keys:
            ch.queue_bind(self._name, self._t.topology.events_exchange, key)
        ch.basic_qos(prefetch_size=0, prefetch_count=self._prefetch, a_global=False)
        self._buffer.clear()
        self._cancelled = False
        self._consumer_tag = ch.basic_consume(
            self._name, callback=self._on_delivery, on_cancel=self._on_cancel
        )
        self._channel = ch
        self._assembler.reset()
        # Only on a native socket: gevent's and eventlet's wait inside recv(MSG_DONTWAIT)
        # instead of failing with EAGAIN, which would stall this source's waits.
        native = isinstance(getattr(conn.transport, "sock", None), _socket.socket)
        self._reader = reader = _install_reader(conn) if native else None
        if reader is not None and _OWN_DELIVER:
            # Every read, py-amqp's own waits (bind-ok, confirms) included, passes the
            # consume channel's deliveries to _on_deliver_frame: none is half-read by both.
            self._consume_id = ch.channel_id
            conn.transport.read_frame = functools.partial(self._read_frame, reader, conn)
        else:
            self._consume_id = -1
        if self._dead_queue is not None:
            # Dead letters are rare: a confirm channel that waits for each one is enough.
            confirm = conn.channel()
            confirm.events["basic_return"].add(self._on_return)
            self._confirm = confirm

    def _on_lost(self) -> None:
        self._buffer.clear()
        self._channel = self._confirm = None
        self._reader = None
        self._assembler.reset()
        self._consume_id = -1

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        self._returned = True

    def _retrying(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the current channel, reconnecting (and retrying) when it is lost."""
        while True:
            self._ensure()
            try:
                return fn()
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                if is_fatal(exc):
                    raise self._error(exc, what) from exc
                self._recover(exc)

    def bind(self, keys: Sequence[str]) -> None:
        """Bind the queue with each key (kept, and bound again after a reconnect)."""
        for key in keys:
            if key not in self._keys:
                self._keys.append(key)
        exchange = self._t.topology.events_exchange

        def run() -> None:
            for key in keys:
                self._channel.queue_bind(self._name, exchange, key)

        self._retrying("bind", run)

    def unbind(self, keys: Sequence[str]) -> None:
        """Remove those bindings (also from what a reconnect binds again)."""
        gone = set(keys)
        self._keys = [k for k in self._keys if k not in gone]
        exchange = self._t.topology.events_exchange

        def run() -> None:
            for key in keys:
                self._channel.queue_unbind(self._name, exchange, key)

        self._retrying("unbind", run)

    def wake(self) -> None:
        """End a get() waiting in another thread (thread-safe; at most one byte in flight)."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _clear_wake(self) -> None:
        # Read first, then reset the flag: a wake() in between finds it still set and
        # sends nothing, which is fine because this get() is returning anyway.
        with contextlib.suppress(OSError):
            while self._wake_r.recv(64):
                pass
        with self._wake_lock:
            self._wake_pending = False

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting, until ``enough()``.

        With a :class:`_FrameReader` (plain TCP) frames are cut out of 64 KiB reads: py-amqp
        reads each frame with three ``recv`` calls (nine per event), which was most of a
        busy subscriber's CPU. Otherwise (SSL) the socket is made non-blocking once per
        drain instead of py-amqp switching its timeout around every frame. Heartbeat
        accounting is unchanged: py-amqp's frame handler counts received frames.
        """
        conn = self._conn
        reader = self._reader
        if reader is not None:
            _drain_frames(conn, reader, enough, deliver_id=self._consume_id,
                          assembler=self._assembler, on_deliver=self._on_deliver_frame)
            return
        transport = conn.transport
        read_frame = transport.read_frame
        on_frame = conn.on_inbound_frame
        sock = transport.sock
        previous = sock.gettimeout()
        sock.settimeout(0)
        try:
            while not enough():
                try:
                    frame = read_frame()  # a partial frame is kept by py-amqp for next time
                except TimeoutError:
                    return
                on_frame(frame)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def _read_frame(self, reader: _FrameReader, conn: Any, *args: Any) -> tuple[int, int, bytes]:
        """``transport.read_frame`` of ``conn`` for py-amqp's own waits: the next frame
        that is not part of a delivery on the consume channel (those go to
        :meth:`_on_deliver_frame`). Bound to its connection's reader, so a late read on a
        replaced connection never touches the new one."""
        if reader is not self._reader:  # a dead connection being closed: plain frames
            return reader.read_frame(*args)
        while True:
            frame = reader.read_frame(*args)
            if frame[1] == self._consume_id and (
                self._assembler.busy or (frame[0] == 1 and frame[2].startswith(_BASIC_DELIVER))
            ):
                conn.bytes_recv += 1
                self._on_deliver_frame(frame)
                continue
            return frame

    def _on_deliver_frame(self, frame: tuple[int, int, bytes]) -> None:
        """A frame of a basic.deliver on the consume channel, assembled into a Delivery
        with what py-amqp's frame handler, Channel and :func:`_to_delivery` would make."""
        done = self._assembler.feed(frame)
        if done is None:
            return
        (consumer_tag, delivery_tag, redelivered, exchange, routing_key), props, body = done
        channel = self._channel
        if channel is None or channel.is_closing:
            return  # py-amqp ignores what arrives on a closing channel
        if consumer_tag != self._consumer_tag:  # as py-amqp: nobody consumes with that tag
            log.warning("rejecting delivery %s for unknown consumer %r", delivery_tag,
                        consumer_tag)
            channel.basic_reject(delivery_tag, requeue=True)
            return
        if "content_encoding" in props and channel.auto_decode:
            with contextlib.suppress(Exception):  # as py-amqp: keep the bytes if it fails
                body = _as_bytes(body.decode(props["content_encoding"]))
        headers = props.get("application_headers")
        epoch = self._epoch
        self._buffer.append(Delivery(
            body=body,
            delivery_tag=encode_tag(epoch, delivery_tag),
            content_type=props.get("content_type"),
            headers=dict(headers) if headers else {},
            reply_to=props.get("reply_to"),
            correlation_id=props.get("correlation_id"),
            redelivered=redelivered,
            routing_key=routing_key,
            properties={k: v for k, v in props.items() if k not in _OWN_FIELDS},
            epoch=epoch,
            exchange=exchange,
        ))

    def _wait(self, deadline: float, done: Callable[[], bool]) -> None:
        """Process frames until ``done()``, the deadline, or a wake()."""
        conn = self._conn
        wake = self._wake_r
        while True:
            self._drain_nowait(done)  # frames already received
            if done():
                return
            self._tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                ready, _, _ = select.select(
                    [conn.sock, wake], [], [], min(remaining, self._max_wait)
                )
            except (OSError, ValueError, TypeError) as exc:  # socket closed under us
                raise BrokerUnavailableError(f"event source socket failed: {exc}") from exc
            if wake in ready:
                self._clear_wake()
                return

    def get(self, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s (or until wake()) for events; return every buffered one."""
        deadline = time.monotonic() + max(0.0, timeout)
        buffer = self._buffer
        while True:
            self._ensure()
            try:
                if self._cancelled:
                    raise BrokerUnavailableError("consumer cancelled by the broker")
                if not buffer:
                    self._wait(deadline, lambda: bool(buffer) or self._cancelled)
                if buffer:
                    self._drain_nowait(lambda: len(buffer) >= self._prefetch)
                break
            except BramaError as exc:
                if not isinstance(exc, BrokerUnavailableError) or self._closed:
                    raise
                self._recover(exc)
            except RECOVERABLE_ERRORS as exc:
                self._recover(exc)
            if time.monotonic() >= deadline:
                break
        epoch = self._epoch
        # Deliveries assembled by _on_deliver_frame are ready; py-amqp's (SSL) are not.
        out = [m if type(m) is Delivery else _to_delivery(m, epoch) for m in buffer]
        buffer.clear()
        self._counts["delivered"] += len(out)
        return out

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Ack up to ``delivery_tag``; tags from an earlier connection are ignored."""
        epoch, tag = decode_tag(delivery_tag)
        if epoch != self._epoch or self._channel is None or self._lost is not None:
            self._stale_acks += 1
            return
        try:
            self._channel.basic_ack(tag, multiple=multiple)
        except RECOVERABLE_ERRORS as exc:
            if not _recoverable(exc):
                raise
            self._recover(exc)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy ``delivery`` to the dead-letter queue with ``x-brama-error``, confirmed.

        Sent through the default exchange straight to the queue, ``mandatory`` so a
        deleted dead-letter queue is an error rather than silent loss. The caller acks.
        """
        dead = self._dead_queue
        if dead is None:
            raise TransportError(f"{self.role}: queue {self._name!r} has no dead-letter queue")
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        headers["x-brama-original-queue"] = self._name
        props = {k: v for k, v in delivery.properties.items() if k not in _NOT_COPIED}
        if delivery.content_type is not None:
            props["content_type"] = delivery.content_type
        msg = Message(delivery.body, delivery_mode=2, application_headers=headers, **props)

        def run() -> None:
            self._returned = False
            try:
                self._confirm.basic_publish_confirm(
                    msg, "", dead, mandatory=True, confirm_timeout=self._t.confirm_timeout
                )
            except MessageNacked as exc:
                raise ConfirmError(f"{self.role}: the broker refused the dead letter") from exc
            if self._returned:
                raise TransportError(f"{self.role}: dead-letter queue {dead!r} does not exist")

        self._retrying("dead-letter", run)
        self._counts["dead_lettered"] += 1

    def depth(self) -> int:
        """Messages ready in the queue (a passive declare: one round trip)."""
        return self._retrying(
            "depth",
            lambda: int(self._channel.queue_declare(self._name, passive=True).message_count),
        )

    def stats(self) -> dict[str, int]:
        """Delivered, dead-lettered, reconnects and ignored (stale) acks. No ``dropped``:
        RabbitMQ does not count what ``x-max-length`` removes."""
        return {
            "reconnects": self._counters["reconnects"],
            "stale_acks": self._stale_acks,
            **self._counts,
        }

    def close(self) -> None:
        """Close the connection (an exclusive queue goes with it) and the wake-up pair."""
        super().close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()


class _RpcSlot:
    """One RPC in flight: sent on connection ``epoch`` (0: not yet), answered or returned."""

    __slots__ = ("body", "done", "epoch", "returned")

    def __init__(self) -> None:
        self.epoch = 0
        self.done = False
        self.returned = False
        self.body = b""


#: Commands a client link keeps while the broker has not confirmed them (see
#: :class:`AmqpClientLink`); ``BRAMA_CLIENT_BUFFER`` / ``Brama(buffer_size=...)``.
DEFAULT_CLIENT_BUFFER = 10_000
#: While nobody waits for a frame, a client link reads the confirms every this many
#: seconds instead of waking up for each (one wake-up per command, at 500 commands/s,
#: was most of a client's CPU per command here).
_IDLE_DRAIN = 0.1
#: Seconds between two log lines about commands the broker returned as unroutable.
_RETURN_LOG_INTERVAL = 10.0


class AmqpClientLink(_AmqpLink):
    """Commands and RPC for clients; safe to share between threads.

    **Reading.** A caller waiting for a confirm or a reply reads the socket itself when
    nobody else does (leader/followers, see :meth:`_wait_for`); the others sleep on one
    Condition. **One I/O thread per link** reads confirms nobody waits for every
    ``_IDLE_DRAIN`` s (not one wake-up per confirm), keeps heartbeats going and, when the
    connection is lost, reconnects with backoff (capped at the transport's
    ``max_backoff``) for as long as the link is open, then republishes every unconfirmed
    command in order. Callers write under the lock: a command is framed here (no py-amqp
    ``Message``, no per-publish read of incoming frames) and written at once.

    **Buffer.** Every command stays in the link until the broker confirmed it: sent and
    unconfirmed, or waiting for the broker to come back. :meth:`post` returns once the
    command is written (``confirm=True``: once confirmed while connected) or, while the
    broker is away, buffered; when ``max_buffer`` commands already wait it raises
    :class:`~brama_mq.errors.OutboxFullError` and keeps nothing (while connected it waits
    for confirms instead): a command is never dropped without the caller hearing of it.
    :meth:`send` / :meth:`send_many` post and wait for the confirms; :meth:`flush` waits
    for everything posted so far.

    RPC requests go out on the same channel as commands (it consumes the direct
    reply-to pseudo-queue), so a query sent after a command reaches the owner after it.
    """

    role = "client link"

    def __init__(self, transport: AmqpTransport, *, max_buffer: int | None = None) -> None:
        self._lock = threading.Lock()  # not re-entrant: _wait_for releases it to select
        self._cond = threading.Condition(self._lock)
        self._tracker = _ConfirmTracker()
        self._by_id: dict[str, _Pending] = {}
        self._rpc: dict[str, _RpcSlot] = {}
        self._confirm: Any = None
        self._reader: _FrameReader | None = None
        self._reading = False  # a waiting caller is reading the socket (see _wait_for)
        self._exchange = transport.topology.commands_exchange
        self._exchange_word = _shortstr(self._exchange) or b""
        self.max_buffer = DEFAULT_CLIENT_BUFFER if max_buffer is None else max_buffer
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._last_return_log = 0.0
        self._stats = {"sent": 0, "requests": 0, "republished": 0, "returned": 0, "refused": 0}
        self._stop = threading.Event()
        self.pid = os.getpid()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            with self._lock:
                super().__init__(transport)
        except BaseException:
            self._close_wake()
            raise
        self._io = threading.Thread(target=self._io_loop, name="brama-client-io", daemon=True)
        self._io.start()
        _CLIENT_LINKS.add(self)

    def _setup(self, conn: Any) -> None:
        topo = self._t.topology
        # Checked passively (plus the shard record), so a reporting service needs no
        # configure permission on the owner's queues once an owner has declared them.
        confirm = self._t._declare_shared(
            conn, [(topo.commands_exchange, "direct")],
            [q for q, _ in topo.owner_queues()], record=True,
        )
        confirm.confirm_select()
        confirm.events["basic_ack"].add(self._on_ack)
        confirm.events["basic_nack"].add(self._tracker.on_nack)
        confirm.events["basic_return"].add(self._on_return)
        confirm.basic_consume(DIRECT_REPLY_TO, no_ack=True, callback=self._on_reply)
        self._confirm = confirm
        # The buffered reader reads with MSG_DONTWAIT, which a cooperative socket (gevent's
        # monkey-patching) turns into a wait: there, py-amqp reads as before.
        sock = getattr(getattr(conn, "transport", None), "sock", None)
        native = type(sock).__module__ == "socket"
        self._reader = _install_reader(conn) if native else None
        again = self._tracker.restart()
        if again:
            self._write(again)
            self._stats["republished"] += len(again)

    def _on_lost(self) -> None:
        self._confirm = None
        self._reader = None

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting: through the buffered
        reader (as the owner link), confirms of the command channel handled here
        without py-amqp's dispatch, every other frame by py-amqp, in order."""
        reader = self._reader
        if reader is None:
            super()._drain_nowait(enough)
            return
        _drain_frames(self._conn, reader, enough, confirm=self._confirm, on_ack=self._on_ack)

    # -- callbacks (run inside drain_events, with the lock held) -----------------
    def _on_ack(self, tag: int, multiple: bool) -> None:
        tracker = self._tracker
        by_id = self._by_id
        for p in tracker._settle(tag, multiple):
            p.done = True
            tracker.confirmed += 1
            if p.event is not None:
                by_id.pop(p.event.message_id, None)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        props = message.properties
        slot = self._rpc.get(props.get("correlation_id") or "")
        if slot is not None:
            slot.returned = True
            return
        self._stats["returned"] += 1
        pending = self._by_id.get(props.get("message_id") or "")
        if pending is not None:
            pending.returned = True
        now = time.monotonic()
        if now - self._last_return_log >= _RETURN_LOG_INTERVAL:
            self._last_return_log = now
            log.warning(
                "client link: a command to %r was returned unroutable: nothing is bound to "
                "it on %r (%d returned so far)", routing_key, exchange, self._stats["returned"]
            )

    def _on_reply(self, msg: Any) -> None:
        slot = self._rpc.get(msg.properties.get("correlation_id", ""))
        if slot is not None:  # late replies to requests that timed out are dropped
            slot.body = _as_bytes(msg.body)
            slot.done = True

    # -- the I/O thread ---------------------------------------------------------------
    def _connected(self) -> bool:
        return self._conn is not None and self._lost is None and self._confirm is not None

    def _io_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                with self._lock:
                    conn = self._conn if self._connected() else None
                if conn is None:
                    if self._reconnect():
                        attempt = 0
                    else:
                        attempt += 1
                        self._stop.wait(_backoff(attempt - 1, self._t.max_backoff))
                    continue
                # Confirms nobody waits for are read in bulk every _IDLE_DRAIN s rather
                # than one wake-up each (with nothing unconfirmed: only for heartbeats);
                # a caller waiting for a frame reads the socket itself (see _wait_for),
                # so this thread never competes with it.
                idle = self._max_wait if not self._tracker.outstanding() else _IDLE_DRAIN
                try:
                    readable, _, _ = select.select(
                        [self._wake_r], [], [], min(self._max_wait, idle)
                    )
                except (OSError, ValueError):
                    readable = []
                if readable:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                with self._lock:
                    if self._closed or self._conn is not conn or self._lost is not None:
                        continue
                    try:
                        if not self._reading:
                            self._drain_nowait(lambda: False)
                            self._republish_nacked()
                        self._tick()
                    except RECOVERABLE_ERRORS as exc:
                        self._mark_lost(exc)
                    self._cond.notify_all()
            except Exception:  # the I/O thread must outlive any surprise
                log.exception("client link: I/O thread error; reconnecting")
                with self._lock:
                    self._mark_lost(BrokerUnavailableError("I/O thread error"))
                self._stop.wait(0.5)

    def _mark_lost(self, exc: BaseException) -> None:
        """Forget a dead connection (lock held); the I/O thread reconnects."""
        if self._conn is None and self._lost is not None:
            return
        if not self._closed:
            log.warning("%s lost its connection to %s (%s); reconnecting (%d commands kept)",
                        self.role, self._connector.host, describe(exc, self._t.url),
                        self._tracker.outstanding())
            self._counters["reconnects"] += 1
        self._connector.drop()
        self._connector.switch_next()
        self._conn = None
        self._lost = exc
        self._on_lost()
        self._cond.notify_all()

    def _reconnect(self) -> bool:
        """One attempt: connect without the lock (callers keep buffering meanwhile), then
        set up and republish under it. False when the broker is still away."""
        try:
            conn = self._connector.connect()
        except RECOVERABLE_ERRORS as exc:
            self._connector.drop()
            with self._lock:
                self._lost = exc
            log.warning("%s cannot reach %s (%s); %d commands waiting", self.role,
                        self._t.masked_url, describe(exc, self._t.url),
                        self._tracker.outstanding())
            return False
        with self._lock:
            if self._closed:
                return True
            try:
                self._conn = conn
                self._epoch += 1
                self._setup(conn)
                self._lost = None
            except RECOVERABLE_ERRORS as exc:
                self._connector.drop()
                self._conn = None
                self._lost = exc
                self._on_lost()
                return False
            self._cond.notify_all()
        log.info("%s connected to %s (epoch %d)", self.role, self._connector.host, self._epoch)
        return True

    def _wake_io(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- writing (lock held) -------------------------------------------------------
    def _new_pending(self, body: bytes, routing_key: str, message_id: str | None) -> _Pending:
        mid = message_id or f"{self._id_prefix}{next(self._ids):x}"
        pending = self._tracker.new(self._exchange, routing_key, None)
        pending.event = Outgoing(routing_key, body, True, mid)
        self._by_id[mid] = pending
        return pending

    @staticmethod
    def _message(pending: _Pending) -> Any:
        if pending.message is None:
            assert pending.event is not None
            ev = pending.event
            pending.message = Message(ev.body, delivery_mode=2, content_type=JSON,
                                      message_id=ev.message_id)
        return pending.message

    def _write(self, pendings: Sequence[_Pending]) -> None:
        """Frame and write publishes on the confirm channel, each registered first (so a
        failed write is republished by the reconnect)."""
        conn = self._conn
        confirm = self._confirm
        tracker = self._tracker
        channel_id = confirm.channel_id
        frame_max = conn.frame_max
        word = self._exchange_word
        parts: list[bytes] = []
        size = 0
        for p in pendings:
            tracker.register(p)
            framed = (
                _frame_publish(parts, channel_id, word, p.event, 2, True, frame_max)
                if _BATCHED_FRAMING and word and p.event is not None
                else 0
            )
            if not framed:
                if parts:
                    AmqpOwnerLink._write(conn, parts)
                    parts, size = [], 0
                _publish(confirm, self._message(p), p.exchange, p.routing_key, True)
                continue
            size += framed
            if size >= _WRITE_CHUNK:
                AmqpOwnerLink._write(conn, parts)
                parts, size = [], 0
        if parts:
            AmqpOwnerLink._write(conn, parts)

    def _post(self, messages: Sequence[tuple[bytes, str, str | None]]) -> list[_Pending]:
        """Hand commands over (lock held): written now if connected, else kept for the
        reconnect. OutboxFullError, with nothing kept, if they do not fit the buffer."""
        if self._closed:
            raise TransportError("client link is closed")
        tracker = self._tracker
        waiting = tracker.outstanding()
        if waiting + len(messages) > self.max_buffer // 2 and self._connected():
            # Confirms may be waiting unread (see _io_loop): read them now; when the
            # buffer is full while connected, wait for confirms (backpressure) rather
            # than refuse at once.
            if not self._reading:
                try:
                    self._drain_nowait(lambda: False)
                except RECOVERABLE_ERRORS as exc:
                    self._mark_lost(exc)
                    self._wake_io()
            if tracker.outstanding() + len(messages) > self.max_buffer:
                room = self.max_buffer - len(messages)
                self._wait_for(
                    time.monotonic() + self._t.confirm_timeout,
                    lambda: tracker.outstanding() <= room or not self._connected(),
                )
            waiting = tracker.outstanding()
        if waiting + len(messages) > self.max_buffer:
            self._stats["refused"] += len(messages)
            state = "connected" if self._connected() else "the broker is away"
            raise OutboxFullError(
                f"client buffer full: {waiting} commands wait for the broker's confirm "
                f"({state}; {self._t.masked_url}); buffer size {self.max_buffer} "
                f"(BRAMA_CLIENT_BUFFER); {len(messages)} not sent"
            )
        batch = [self._new_pending(body, key, mid) for body, key, mid in messages]
        self._stats["sent"] += len(batch)
        if self._connected():
            try:
                self._write(batch)
            except RECOVERABLE_ERRORS as exc:
                self._mark_lost(exc)  # registered: the reconnect republishes them
                self._wake_io()
        else:
            for p in batch:
                tracker.defer(p)
        return batch

    def _republish_nacked(self) -> None:
        nacked = self._tracker.take_nacked()
        if nacked:
            self._write(nacked)
            self._stats["republished"] += len(nacked)

    def _forget_pending(self, pending: _Pending) -> None:
        if pending.event is not None:
            self._by_id.pop(pending.event.message_id, None)
        if not pending.done:  # given up: stop tracking it (no republish later)
            tracker = self._tracker
            for tag, p in list(tracker.unconfirmed.items()):
                if p is pending:
                    del tracker.unconfirmed[tag]
            tracker.nacked = [p for p in tracker.nacked if p is not pending]

    def _wait_for(self, deadline: float, done: Callable[[], bool]) -> None:
        """Wait (lock held; released while waiting) until ``done()`` or the deadline.

        Leader and followers: one waiting caller at a time reads the socket itself
        (select without the lock, then drain under it) and wakes the others when
        something arrived; the rest wait on the condition. So a confirm or a reply costs
        the caller one wake-up, no hand-off through another thread, and waiting threads
        do not all wake for every frame. While the broker is away everyone waits for the
        I/O thread's reconnect.
        """
        cond = self._cond
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._reading or not self._connected():
                cond.wait(remaining)
                continue
            conn = self._conn
            sock = conn.sock
            self._reading = True
            self._lock.release()
            try:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    select.select([sock], [], [], min(remaining, self._max_wait))
            finally:
                self._lock.acquire()
                self._reading = False
            if self._conn is conn and self._lost is None and not self._closed:
                try:
                    self._drain_nowait(lambda: False)
                    self._republish_nacked()
                except RECOVERABLE_ERRORS as exc:
                    self._mark_lost(exc)
                    self._wake_io()
            cond.notify_all()

    def _unconfirmed_error(self, missing: int, total: int) -> TransportError:
        if not self._connected():
            cause = self._lost
            detail = f" ({describe(cause, self._t.url)})" if cause is not None else ""
            return BrokerUnavailableError(
                f"{missing} of {total} commands not confirmed within "
                f"{self._t.confirm_timeout} s: the broker is away{detail} "
                f"({self._t.masked_url})"
            )
        return ConfirmError(
            f"{missing} of {total} commands not confirmed within {self._t.confirm_timeout} s "
            f"({self._t.masked_url})"
        )

    # -- API ----------------------------------------------------------------------
    def post(
        self,
        body: bytes,
        routing_key: str = "owner",
        *,
        message_id: str | None = None,
        confirm: bool = False,
    ) -> bool:
        """Publish a persistent command; it stays in the link's buffer until confirmed,
        through reconnects (republished in order). OutboxFullError when ``max_buffer``
        commands already wait.

        ``confirm=False``: return at once. ``confirm=True``: while connected, wait for
        the broker's confirm (so a busy client is paced by the broker, as with
        :meth:`send`) and return True; while the broker is away (or if the connection
        drops during the wait) return False at once, the command buffered. ConfirmError
        (the command given up) if a connected broker does not confirm it within
        ``confirm_timeout``; TransportError if it was returned unroutable.
        """
        deadline = time.monotonic() + self._t.confirm_timeout
        with self._lock:
            (pending,) = self._post([(body, routing_key, message_id)])
            if not confirm or not self._connected():
                return False
            self._wait_for(deadline, lambda: pending.done or not self._connected())
            if pending.done:
                if pending.returned:
                    raise TransportError(
                        f"command unroutable: nothing bound to {routing_key!r} on "
                        f"{self._exchange!r}"
                    )
                return True
            if not self._connected():
                return False
            self._forget_pending(pending)
            raise self._unconfirmed_error(1, 1)

    def post_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """:meth:`post` for several commands ``(body, routing_key)``, written together;
        all or none: OutboxFullError keeps none of them."""
        if messages:
            with self._lock:
                self._post([(body, key, None) for body, key in messages])

    def send(self, body: bytes, routing_key: str = "owner", *, message_id: str | None = None
             ) -> None:
        """Publish a persistent command and return once the broker confirmed it.

        ConfirmError if it is not confirmed within the transport's ``confirm_timeout``
        (BrokerUnavailableError if the broker is away then; the command is given up);
        TransportError if nothing is bound to ``routing_key`` (the broker returned it);
        OutboxFullError if the buffer is full.
        """
        self._send_confirmed([(body, routing_key, message_id)])

    def send_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """Publish persistent commands ``(body, routing_key)`` pipelined, in order, and
        return once the broker confirmed every one (one wait for the whole batch).

        Errors as :meth:`send`. After an error some of them may have been confirmed
        already: a caller that sends the batch again delivers those twice (at least once).
        """
        if messages:
            self._send_confirmed([(body, key, None) for body, key in messages])

    def _send_confirmed(self, messages: Sequence[tuple[bytes, str, str | None]]) -> None:
        deadline = time.monotonic() + self._t.confirm_timeout
        with self._lock:
            batch = self._post(messages)
            try:
                self._wait_for(deadline, lambda: all(p.done for p in batch))
            finally:
                for p in batch:
                    self._forget_pending(p)
            settled = sum(1 for p in batch if p.done)
            returned = [p.routing_key for p in batch if p.returned]
            if returned:
                raise TransportError(
                    f"{len(returned)} command(s) unroutable: nothing bound to "
                    f"{returned[0]!r} on {self._exchange!r}"
                )
            if settled < len(batch):
                raise self._unconfirmed_error(len(batch) - settled, len(batch))

    def pending(self) -> int:
        """Commands handed over and not yet confirmed by the broker."""
        with self._lock:
            return self._tracker.outstanding()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every command posted so far is confirmed; False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            mark = self._tracker.seq
            self._wait_for(deadline, lambda: self._tracker.settled_through() >= mark)
            return self._tracker.settled_through() >= mark

    def request(self, body: bytes, timeout: float, routing_key: str = "owner") -> bytes:
        """RPC over direct reply-to; RequestTimeoutError when no answer arrives in time
        (BrokerUnavailableError when the broker was away all along).

        The request goes out on the commands' channel, after every command posted
        before it. One in flight when the connection drops is sent again on the new one
        (queries are idempotent; a duplicate probe lease times out).
        """
        corr = uuid.uuid4().hex
        deadline = time.monotonic() + max(0.0, timeout)
        exchange = self._exchange
        msg = Message(
            body,
            delivery_mode=1,
            content_type=JSON,
            correlation_id=corr,
            reply_to=DIRECT_REPLY_TO,
            application_headers={"x-brama-deadline": int(time.time() * 1000 + timeout * 1000)},
        )
        slot = _RpcSlot()
        with self._lock:
            if self._closed:
                raise TransportError("client link is closed")
            self._rpc[corr] = slot
            self._stats["requests"] += 1
            try:
                while not (slot.done or slot.returned):
                    if slot.epoch != self._epoch and self._connected():
                        slot.epoch = self._epoch
                        try:
                            self._tracker.next_tag += 1  # a tag of the channel nobody waits for
                            _publish(self._confirm, msg, exchange, routing_key, True)
                        except RECOVERABLE_ERRORS as exc:
                            self._mark_lost(exc)
                            self._wake_io()
                            continue
                    if time.monotonic() >= deadline:
                        break
                    self._wait_for(
                        deadline,
                        lambda: slot.done
                        or slot.returned
                        or (slot.epoch != self._epoch and self._connected()),
                    )
            finally:
                self._rpc.pop(corr, None)
            if slot.done:
                return slot.body
            if slot.returned:
                raise TransportError(
                    f"request unroutable: nothing bound to {routing_key!r} on {exchange!r}"
                )
            if slot.epoch == 0 and not self._connected():
                raise self._error(self._lost or OSError("not connected"),
                                  f"request (no connection within {timeout} s)")
        raise RequestTimeoutError(
            f"no answer on {routing_key!r} within {timeout} s (is an owner running?)"
        )

    def stats(self) -> dict[str, int]:
        """Counters: sent, requests, republished, returned, refused (buffer full),
        confirmed, nacked, reconnects, pending."""
        with self._lock:
            out = dict(self._stats)
            out["confirmed"] = self._tracker.confirmed
            out["nacked"] = self._tracker.nacks
            out["reconnects"] = self._counters["reconnects"]
            out["pending"] = self._tracker.outstanding()
            return out

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for unconfirmed commands (when connected), then stop
        the I/O thread and close the connection. Commands still unconfirmed are logged."""
        if self._closed:
            return
        if self.pid != os.getpid():  # the parent's link, inherited by fork: not ours
            self._closed = True
            return
        with self._lock:
            connected = self._connected()
        if connected and not self.flush(timeout):
            log.warning("%s closed with %d commands unconfirmed", self.role, self.pending())
        elif not connected and self.pending():
            log.warning("%s closed while the broker is away: %d commands not sent",
                        self.role, self.pending())
        self._stop.set()
        self._wake_io()
        io = self._io
        if io is not threading.current_thread():
            io.join(timeout=max(1.0, self._t.connect_timeout + 1))
        with self._lock:
            self._cond.notify_all()
            super().close()
        self._close_wake()

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

_CLIENT_LINKS: weakref.WeakSet[AmqpClientLink] = weakref.WeakSet()


def _flush_client_links(timeout: float = 5.0) -> None:
    """At exit: give posted commands up to ``timeout`` s to be confirmed."""
    pid = os.getpid()
    for link in list(_CLIENT_LINKS):
        if link.pid == pid and not link._closed and link.pending() and not link.flush(timeout):
            log.warning("client link (pid %d): %d commands not confirmed before exit",
                        pid, link.pending())


atexit.register(_flush_client_links)


class AmqpTransport:
    """Links to one RabbitMQ broker (or failover list) for one topology.

    ``url`` is a kombu URL (``amqp://user:pass@host:5672/vhost``, ``;``-separated for
    failover). Links reconnect by themselves with exponential backoff and jitter (capped
    at ``max_backoff``) for up to ``reconnect_timeout`` seconds per outage, then raise
    BrokerUnavailableError (the next call tries again). The URL's password is masked in
    every message and log line.

    Heartbeats (``heartbeat`` s, 0 to disable) are sent from the calls themselves: an
    owner must call ``fetch`` or ``wait_confirms`` at least every ``heartbeat`` seconds
    or the broker drops the connection (the link then reconnects on its next call);
    client links run a small daemon thread for that.
    """

    def __init__(
        self,
        url: str,
        topology: Topology | None = None,
        *,
        connect_timeout: float = 5.0,
        heartbeat: float = 30.0,
        ssl: bool | dict[str, Any] | None = None,
        reconnect_timeout: float = 60.0,
        max_backoff: float = 5.0,
        confirm_timeout: float = 30.0,
        write_timeout: float | None = 30.0,
    ) -> None:
        self.url = url
        self.masked_url = mask_url(url)
        self.topology = topology or Topology()
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.ssl = ssl
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff
        self.confirm_timeout = confirm_timeout
        self.write_timeout = write_timeout
        self._links: list[_AmqpLink] = []
        self._lock = threading.Lock()
        self._declared: set[tuple[str, str]] = set()
        self._dead_kept = False  # warned that an earlier version's dead queue is kept

    def __repr__(self) -> str:
        return f"AmqpTransport({self.masked_url!r}, prefix={self.topology.prefix!r})"

    # -- plumbing used by links --------------------------------------------------
    def _new_kombu_connection(self) -> Any:
        options: dict[str, Any] = {}
        if self.write_timeout:
            options["write_timeout"] = self.write_timeout
        return KombuConnection(
            self.url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            # A copy: kombu writes the host name into a dict's server_hostname.
            ssl=dict(self.ssl) if isinstance(self.ssl, dict) else bool(self.ssl),
            transport_options=options,
        )

    def _declare_on(self, channel: Any) -> None:
        topology = self.topology
        try:
            declare_topology(channel, topology)
        except PreconditionFailed as exc:
            mismatch = self._shard_mismatch(exc)
            if mismatch is not None:
                raise mismatch from exc
            # A dead queue an earlier version made (classic, or unbounded): keep it as it
            # is rather than refuse to start, and say how to migrate it.
            if topology.dead_queue not in str(exc):
                raise
            log.log(
                logging.DEBUG if self._dead_kept else logging.WARNING,
                "%s (%s)", kept_queue_warning(topology.dead_queue, str(exc)),
                describe(exc, self.url),
            )
            self._dead_kept = True
            if not channel.is_open:  # py-amqp reopens a channel the broker closed
                channel.open()
            declare_topology(channel, topology, dead_as_found=True)
        for name, _ in self.topology.exchanges():
            self._note("exchange", name)
        for name in self.topology.queue_names():
            self._note("queue", name)

    def _shard_mismatch(self, exc: BaseException) -> ShardMismatchError | None:
        """The clear error for a refused shard record, or None for other refusals."""
        text = str(exc)
        if self.topology.shard_record not in text:
            return None
        stored = stored_shards(self.topology, text)
        return ShardMismatchError(self.topology.prefix, self.topology.shards, stored)

    def _declare_shared(
        self,
        conn: Any,
        exchanges: Sequence[tuple[str, str]],
        queues: Sequence[str],
        *,
        record: bool = False,
        owner_side: bool = True,
    ) -> Any:
        """A channel, after checking the shared topology a client or subscriber uses.

        Passive declares need no permission, so a restricted user only needs the names it
        creates itself. When something is missing (no owner has run yet) the whole topology
        is declared, which needs configure permission (guest has it; a restricted user gets
        AccessRefusedError saying so). ``record``: also check the shard count (a client
        routes by it). ``owner_side=False`` (subscribers): bootstrap only the exchanges, so
        a subscriber, which does not know the shard count, never stores one.
        """
        ch = conn.channel()
        try:
            for name, kind in exchanges:
                ch.exchange_declare(name, kind, passive=True)
            for queue in queues:
                ch.queue_declare(queue, passive=True)
        except amqp_exc.NotFound:
            ch = conn.channel()  # the failed check closed the other one
            if owner_side:
                self._declare_on(ch)
            else:
                for name, kind in self.topology.exchanges():
                    ch.exchange_declare(name, kind, durable=True, auto_delete=False)
                    self._note("exchange", name)
            return ch
        if record:
            try:
                declare_shard_record(ch, self.topology)
            except amqp_exc.PreconditionFailed as exc:
                mismatch = self._shard_mismatch(exc)
                if mismatch is None:
                    raise
                raise mismatch from exc
        return ch

    def _note(self, kind: str, name: str) -> None:
        self._declared.add((kind, name))

    def _forget(self, link: _AmqpLink) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _track(self, link: _L) -> _L:
        with self._lock:
            self._links.append(link)
        return link

    def declared(self) -> set[tuple[str, str]]:
        """``(kind, name)`` of every exchange and queue declared through this transport."""
        return set(self._declared)

    def _admin(self, what: str, fn: Callable[[Any], None]) -> None:
        """Run ``fn(channel)`` on a short-lived connection, mapping errors."""
        connector = _Connector(self)
        try:
            conn = connector.connect()
            ch = conn.channel()
            fn(ch)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            raise map_error(exc, what, self.url) from exc
        finally:
            connector.close()

    # -- Transport API ------------------------------------------------------------
    def declare(self) -> None:
        """Declare every exchange, queue and binding of the topology (idempotent)."""
        self._admin("declare topology", self._declare_on)

    def delete_topology(self) -> None:
        """Delete every exchange and queue of the topology (tests, demo tear-down)."""
        self._admin("delete topology", lambda ch: delete_topology(ch, self.topology))

    def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> AmqpOwnerLink:
        """A consumer of the owner queue (declares the topology first)."""
        return self._track(AmqpOwnerLink(self, prefetch=prefetch, shard=shard))

    def client_link(self) -> AmqpClientLink:
        """A thread-safe command sender and RPC caller."""
        return self._track(AmqpClientLink(self))

    def event_source(
        self,
        *,
        queue: str | None = None,
        durable: bool = False,
        max_length: int | None = None,
        prefetch: int = 1000,
        quorum: bool = False,
        dead_letter_queue: str | None = None,
        delivery_limit: int | None = None,
    ) -> AmqpEventSource:
        """A subscriber queue bound to the events exchange (see EventSource)."""
        return self._track(
            AmqpEventSource(
                self, queue=queue, durable=durable, max_length=max_length, prefetch=prefetch,
                quorum=quorum, dead_letter_queue=dead_letter_queue,
                delivery_limit=delivery_limit,
            )
        )

    def delete_queues(self, names: Sequence[str]) -> None:
        """Delete queues by name (absent ones are fine): named subscriptions' clean-up."""

        def run(ch: Any) -> None:
            for name in names:
                ch.queue_delete(name)

        self._admin("delete queues", run)

    def stream_reader(
        self, stream: str, *, offset: StreamStart = "first", since_ms: int | None = None
    ) -> Any:
        """A reader of ``stream`` (see :class:`~brama_mq.transport.stream.AmqpStreamReader`)."""
        from brama_mq.transport.stream import AmqpStreamReader

        return self._track(AmqpStreamReader(self, stream, offset=offset, since_ms=since_ms))

    def close(self) -> None:
        """Close every link made by this transport."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

