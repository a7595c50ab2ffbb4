"""AMQP 0-9-1 frames on bytes: the batched framing of event publishes and the fast
reader of inbound frames and deliveries, each checked at import against py-amqp's own
serialisation (the fast paths switch off, loudly in the tests, when py-amqp changes)."""


import errno
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

from amqp import spec

from brama_mq.transport.amqp.messages import event_message
from brama_mq.transport.base import (
    Outgoing,
)

log = logging.getLogger(__name__)

#: py-amqp releases whose private parts (PY_AMQP_PRIVATES) this module was checked
#: against, by tests/test_framing.py on the installed release; that test fails on any
#: other release until it is re-checked and added here.
VERIFIED_PY_AMQP = ("5.4.2",)
#: What this module reads or mirrors of py-amqp beyond its public API.
PY_AMQP_PRIVATES = (
    "amqp.transport.TCPTransport._read_buffer: the bytes py-amqp read ahead, which"
    " FrameReader takes over; and that install_reader can replace a TCPTransport's"
    " read_frame, and uses its sock and connected attributes",
    "amqp.transport._UNAVAIL: the errnos that leave a transport connected (mirrored here"
    " as _UNAVAIL)",
    "amqp.method_framing.frame_writer: the bytes of a publish on its single-buffer path,"
    " and FRAME_OVERHEAD, which chooses that path (mirrored as _FRAME_OVERHEAD)",
    "amqp.method_framing.frame_handler: the frame types it expects on a channel, and"
    " connection.bytes_recv counted once per frame (DeliverAssembler, drain_frames)",
    "amqp.serialization: decode_properties_basic(buf, offset) -> (properties, offset),"
    " and the byte layout of dumps/loads for 'Bssbb' (basic.publish) and 'sLbss'"
    " (basic.deliver)",
    "amqp.abstract_channel.AbstractChannel._pending: the method signatures py-amqp is"
    " waiting for (drain_frames leaves a basic.ack to py-amqp when it waits for one)",
)

#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


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
BASIC_DELIVER = struct.pack(">HH", 60, 60)
_DELIVER_TAG = struct.Struct(">QB")
_BODY_SIZE = struct.Struct(">Q")
#: Flush the framed events to the socket at about this size.
WRITE_CHUNK = 32 * 1024
_PROPS_CACHE: dict[tuple[str | None, int], bytes | None] = {}


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")  # as py-amqp's str_to_bytes


def shortstr(value: str) -> bytes | None:
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
        ct = shortstr(content_type) or b""
        flags |= 0x8000
    if ct or content_type is None:
        prefix = struct.pack(">H", flags) + ct + bytes((delivery_mode,))
    if len(_PROPS_CACHE) < 64:
        _PROPS_CACHE[key] = prefix
    return prefix


def frame_publish(
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
    """Whether :func:`frame_publish` writes what py-amqp's frame writer writes."""
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
            write(1, 7, spec.Basic.Publish, args, event_message(ev, mode))
            ours: list[bytes] = []
            size = frame_publish(ours, 7, b"\x09ex.events", ev, mode, mandatory, 131072)
            if not size or size != len(b"".join(ours)) or b"".join(written) != b"".join(ours):
                return False
        return True
    except Exception:  # any surprise: keep py-amqp's framing
        log.debug("batched framing disabled", exc_info=True)
        return False


BATCHED_FRAMING = _framing_matches()
_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)
#: errno values py-amqp does not treat as a dead connection (amqp.transport._UNAVAIL).
_UNAVAIL = frozenset({errno.EAGAIN, errno.EINTR, errno.ENOENT, errno.EWOULDBLOCK})


class FrameReader:
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
        sock = transport.sock
        if sock is None:  # closed: an OSError, as py-amqp's read on its closed socket
            raise OSError("socket closed")
        while True:
            try:
                data: bytes = sock.recv(65536, flags)
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


class DeliverAssembler:
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
            payload = BASIC_DELIVER + dumps("sLbss", args)
            theirs, _ = loads("sLbss", payload, 4)
            if list(_deliver_args(payload)) != list(theirs):
                return False
        return True
    except Exception:
        log.debug("own basic.deliver parsing disabled", exc_info=True)
        return False


OWN_DELIVER = _deliver_parsing_matches()


def fan_out(callbacks: Any) -> Callable[[int, bool], None]:
    """One ack callback that calls each of ``callbacks`` (py-amqp keeps a set)."""

    def call_all(tag: int, multiple: bool) -> None:
        for callback in callbacks:
            callback(tag, multiple)

    return call_all


def drain_frames(
    conn: Any,
    reader: FrameReader,
    enough: Callable[[], bool],
    *,
    deliver_id: int = -1,
    assembler: DeliverAssembler | None = None,
    on_deliver: Callable[[Any], None] | None = None,
    confirm: Any = None,
    on_ack: Callable[[int, bool], None] | None = None,
) -> None:
    """Process frames already received, without waiting, until ``enough()``: the links'
    shared frame loop over a :class:`FrameReader`.

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
            assembler.busy or (frame[0] == 1 and frame[2].startswith(BASIC_DELIVER))  # type: ignore[union-attr]
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


class Inbound:
    """A delivery as the owner link's consumer callback sees it: what py-amqp's Message
    offers to :func:`to_delivery` (body, properties, delivery_info, channel)."""

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


def install_reader(conn: Any) -> FrameReader | None:
    """Give a plain-TCP py-amqp connection a :class:`FrameReader` (None for others)."""
    from amqp.transport import TCPTransport

    transport: Any = getattr(conn, "transport", None)
    if type(transport) is not TCPTransport:
        return None
    reader = FrameReader(transport)
    transport.read_frame = reader.read_frame
    return reader


def write_frames(conn: Any, parts: list[bytes]) -> None:
    """Write frames framed by :func:`frame_publish` in one call, counted as sent data
    (py-amqp's heartbeat check looks at ``bytes_sent``)."""
    conn.transport.write(b"".join(parts))
    conn.bytes_sent += 1
