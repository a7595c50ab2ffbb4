"""The AMQP frame codec (brama_mq.transport.amqp.framing) on bytes alone, no broker.

py-amqp is the oracle throughout: the batched publish framing must write exactly the
bytes py-amqp's ``frame_writer`` writes (captured through a fake connection and
transport) and decode back with py-amqp's own decoders; the frame reader and the
basic.deliver assembler must give, for deliveries py-amqp itself framed and fed in
chunks cut at arbitrary byte boundaries, what py-amqp's own ``read_frame`` and
``frame_handler`` give; malformed frames raise py-amqp's UnexpectedFrame. The fast paths
read py-amqp's private parts, so the installed py-amqp must be one they were verified
against (framing.VERIFIED_PY_AMQP), and their import-time self-checks must be on: a
silent fallback to py-amqp's slow paths fails here.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import struct
from collections import deque
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import amqp
import amqp.transport
import pytest
from amqp import spec
from amqp.abstract_channel import AbstractChannel
from amqp.exceptions import UnexpectedFrame
from amqp.method_framing import FRAME_OVERHEAD, frame_handler, frame_writer
from amqp.serialization import decode_properties_basic, dumps, loads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brama_mq.transport.amqp import framing
from brama_mq.transport.amqp.messages import as_bytes, event_message
from brama_mq.transport.base import JSON, Outgoing

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_FRAME = struct.Struct(">BHI")
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

Args = tuple[str, int, bool, str, str]
Delivery = tuple[Args, dict[str, Any], bytes]
Frame = tuple[int, int, bytes]


# -- strategies ------------------------------------------------------------------------


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # as py-amqp's str_to_bytes


def _fit(text: str, limit: int = 255) -> str:
    """``text`` cut at a character to at most ``limit`` bytes (a short string)."""
    while len(_enc(text)) > limit:
        text = text[:-1]
    return text


#: ASCII, any code point, and lone surrogates (py-amqp encodes with surrogatepass).
_CHARS = st.one_of(
    st.characters(max_codepoint=0x7F),
    st.characters(),
    st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),
)
#: Short strings of exactly 255 bytes (1-, 2-, 3- and 4-byte characters, surrogates).
AT_LIMIT = ["a" * 255, "\u00e9" * 127 + "a", "\u20ac" * 85, "\U0001f600" * 63 + "abc",
            "\ud800" * 85]
#: One byte (or character) over a short string's 255.
OVER_LIMIT = ["a" * 256, "\u00e9" * 128, "\u20ac" * 86, "\U0001f600" * 64, "\udfff" * 86]
SHORTSTR = st.one_of(st.text(_CHARS, max_size=255).map(_fit), st.sampled_from(AT_LIMIT))
_KEY = st.text(_CHARS, max_size=12).map(_fit)
#: Header table values py-amqp writes and reads back as the same value.
_TABLE_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False) | st.text(_CHARS, max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEY, inner, max_size=3),
    max_leaves=6,
)
HEADERS = st.dictionaries(_KEY, _TABLE_VALUE, max_size=4)
_SHORT_PROPS = ("content_type", "content_encoding", "correlation_id", "reply_to",
                "expiration", "message_id", "type", "user_id", "app_id", "cluster_id")
#: Any subset of basic's properties, every one with values across its range.
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        **{name: SHORTSTR for name in _SHORT_PROPS},
        "application_headers": HEADERS,
        "delivery_mode": st.integers(0, 255),
        "priority": st.integers(0, 255),
        "timestamp": st.integers(0, 2**64 - 1),
    },
)
DELIVER_ARGS = st.tuples(SHORTSTR, st.integers(0, 2**64 - 1), st.booleans(), SHORTSTR,
                         SHORTSTR)
FRAME_MAX = st.one_of(st.sampled_from([4096, 4097, 8192, 131072]), st.integers(4096, 140_000))


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- py-amqp as the oracle -------------------------------------------------------------


def py_amqp_writes(frame_max: int, channel: int, method_sig: tuple[int, int], args: bytes,
                   content: Any) -> list[bytes]:
    """What py-amqp's frame writer hands to ``transport.write`` for one method, one
    bytes object per write call."""
    writes: list[bytes] = []
    conn = SimpleNamespace(frame_max=frame_max, bytes_sent=0)
    transport = SimpleNamespace(write=lambda data: writes.append(bytes(data)))
    frame_writer(conn, transport)(1, channel, method_sig, args, content)
    assert conn.bytes_sent == 1
    return writes


def py_amqp_publish(frame_max: int, channel: int, exchange: str, ev: Outgoing, mode: int,
                    mandatory: bool) -> list[bytes]:
    """py-amqp's writes for the event publish brama's links would otherwise send
    (messages.publish: send_method with 'Bssbb' and event_message)."""
    args = dumps("Bssbb", (0, exchange, ev.routing_key, mandatory, False))
    return py_amqp_writes(frame_max, channel, spec.Basic.Publish, args,
                          event_message(ev, mode))


def py_amqp_deliver(frame_max: int, channel: int, args: Args, properties: dict[str, Any],
                    body: bytes) -> bytes:
    """A basic.deliver's frames (method, header, body split per ``frame_max``) as py-amqp
    serialises them."""
    writes = py_amqp_writes(frame_max, channel, spec.Basic.Deliver, dumps("sLbss", args),
                            amqp.Message(body, **properties))
    return b"".join(writes)


def py_amqp_read_frames(data: bytes) -> list[Frame]:
    """py-amqp's own TCPTransport.read_frame over ``data`` (its read buffer, no socket)."""
    t = amqp.transport.TCPTransport("127.0.0.1:1")
    t._read_buffer = data

    def no_socket(n: int) -> bytes:
        raise AssertionError("py-amqp read past the bytes given")

    t._quick_recv = no_socket
    frames: list[Frame] = []
    while t._read_buffer:
        frames.append(t.read_frame())
    return frames


def py_amqp_assemble(frames: Iterable[Frame]) -> list[Delivery]:
    """Deliveries as py-amqp's frame handler puts them together (args as its channel
    decodes them; an empty body, '' in py-amqp, as bytes, as to_delivery does)."""
    out: list[Delivery] = []

    def callback(channel: int, sig: Any, payload: bytes, msg: Any) -> None:
        assert sig == spec.Basic.Deliver
        args = loads("sLbss", payload, 4)[0]
        out.append((tuple(args), msg.properties, as_bytes(msg.body)))  # type: ignore[arg-type]

    handler = frame_handler(SimpleNamespace(bytes_recv=0), callback)
    for frame in frames:
        handler(frame)
    return out


def split_frames(data: bytes) -> list[Frame]:
    """An independent cut of ``data`` into frames; every frame ends in 0xCE, nothing is
    left over."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        frame_type, channel, size = _FRAME.unpack_from(data, pos)
        end = pos + 7 + size
        assert data[end] == 0xCE, f"frame at {pos} ends in {data[end]:#04x}"
        frames.append((frame_type, channel, data[pos + 7 : end]))
        pos = end + 1
    assert pos == len(data)
    return frames


def frame_bounds(data: bytes) -> list[tuple[int, int]]:
    """(start, end octet's index) of each frame in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        end = pos + 7 + _FRAME.unpack_from(data, pos)[2]
        out.append((pos, end))
        pos = end + 1
    return out


# -- feeding bytes to the reader -------------------------------------------------------


class ChunkSocket:
    """A socket whose ``recv`` returns the next released chunk, one per call; with none
    left it behaves as a socket with nothing to read (BlockingIOError for MSG_DONTWAIT,
    else a timeout)."""

    def __init__(self, bursts: Iterable[Iterable[bytes]]) -> None:
        self.bursts = deque(deque(b) for b in bursts)
        self.ready: deque[bytes] = deque()
        self.calls = 0

    def release(self) -> bool:
        """Make the next burst readable; False when all were."""
        if not self.bursts:
            return False
        self.ready += self.bursts.popleft()
        return True

    def release_all(self) -> None:
        while self.release():
            pass

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.calls += 1
        if not self.ready:
            if flags:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            raise TimeoutError("timed out")
        chunk = self.ready.popleft()
        assert len(chunk) <= bufsize
        return chunk

    def gettimeout(self) -> float | None:
        return None

    @property
    def drained(self) -> bool:
        return not self.ready and not self.bursts


def cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    """``data`` cut at ``points``, no piece longer than one 64 KiB recv."""
    at = sorted({p for p in points if 0 < p < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *at], [*at, len(data)], strict=True)]
    return [p[i : i + 65536] for p in pieces for i in range(0, len(p), 65536)]


def draw_cuts(data: st.DataObject, stream: bytes) -> list[int]:
    """Cut points: random ones, every byte (small streams), or every byte of each frame
    header and each end octet on its own."""
    how = data.draw(st.sampled_from(["random", "bytes", "headers"]), label="split")
    if how == "bytes" and len(stream) <= 12_000:
        return list(range(len(stream)))
    if how == "random":
        return data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=40),
                         label="cuts")
    return [p for start, end in frame_bounds(stream)
            for p in (*range(start + 1, start + 8), end)]


def fake_transport(chunks: list[bytes], read_ahead: bool) -> SimpleNamespace:
    """A transport with py-amqp's attributes the reader uses; with ``read_ahead`` the
    first chunk is what py-amqp already had in its read buffer."""
    first = chunks[0] if read_ahead and chunks else b""
    rest = chunks[1:] if read_ahead and chunks else chunks
    sock = ChunkSocket([rest])
    sock.release_all()
    return SimpleNamespace(_read_buffer=first, sock=sock, connected=True)


def assemble(frames: Iterable[Frame]) -> list[Delivery]:
    """Deliveries as the links put them together with DeliverAssembler."""
    asm = framing.DeliverAssembler()
    out: list[Delivery] = []
    for frame in frames:
        if not asm.busy:  # the links route only a basic.deliver method frame here
            assert frame[0] == 1 and frame[2].startswith(framing.BASIC_DELIVER)
        got = asm.feed(frame)
        if got is not None:
            out.append(got)
    assert not asm.busy, "a delivery was left half-assembled"
    return out


def draw_body(data: st.DataObject, frame_max: int) -> bytes:
    """Empty, small, or about k whole body frames (one byte under, at, one over)."""
    kind = data.draw(st.sampled_from(["empty", "small", "frames"]), label="body")
    if kind == "empty":
        return b""
    if kind == "small":
        return data.draw(st.binary(min_size=1, max_size=300), label="small body")
    chunk = frame_max - 8
    size = data.draw(st.integers(1, 3), label="k") * chunk + data.draw(st.integers(-1, 1))
    return _bytes(size, data.draw(st.integers(0, 2**32), label="seed"))


# -- 1. publish framing: py-amqp's bytes -----------------------------------------------


def _limit(frame_max: int, exchange: str, ev: Outgoing, mode: int, mandatory: bool) -> int:
    """The largest body py-amqp still writes in one buffer for this publish."""
    args = dumps("Bssbb", (0, exchange, ev.routing_key, mandatory, False))
    props = event_message(ev, mode)._serialize_properties()
    return frame_max - 8 - FRAME_OVERHEAD - len(args) - len(props)


def _decode_publish(data: bytes, channel: int) -> tuple[list[Any], dict[str, Any], bytes]:
    """basic.publish's arguments, properties and body, read back from ``data`` with
    py-amqp's decoders."""
    frames = split_frames(data)
    assert [f[1] for f in frames] == [channel] * len(frames)
    (t1, _, method), (t2, _, header), *bodies = frames
    assert (t1, t2, [f[0] for f in bodies]) == (1, 2, [3] * len(bodies))
    assert struct.unpack_from(">HH", method) == spec.Basic.Publish
    args, end = loads("Bssbb", method, 4)
    assert end == len(method)
    class_id, weight, size = struct.unpack_from(">HHQ", header)
    props, end = decode_properties_basic(header, 12)
    assert (class_id, weight, end) == (60, 0, len(header))
    body = b"".join(f[2] for f in bodies)
    assert size == len(body)
    return args, props, body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channel=st.integers(1, 65535),
    exchange=SHORTSTR,
    routing_key=SHORTSTR,
    message_id=SHORTSTR,
    content_type=st.one_of(st.none(), st.just(JSON), SHORTSTR),
    mode=st.one_of(st.sampled_from([1, 2]), st.integers(0, 255)),
    mandatory=st.booleans(),
    frame_max=FRAME_MAX,
    data=st.data(),
)
def test_publish_framing_is_py_amqps_bytes(
    channel: int, exchange: str, routing_key: str, message_id: str, content_type: str | None,
    mode: int, mandatory: bool, frame_max: int, data: st.DataObject,
) -> None:
    """frame_publish writes byte for byte what py-amqp's frame writer writes for the same
    basic.publish (any channel, exchange, utf-8 routing key and message id up to 255
    bytes, content type or none, delivery mode, mandatory bit), for bodies empty, small
    and up to py-amqp's single-buffer limit, returns that size, and the bytes decode back
    with py-amqp's decoders to the fields given; one byte over the limit, where py-amqp
    switches to its multi-write path, it appends nothing and returns 0."""
    ev0 = Outgoing(routing_key, b"", True, message_id, content_type=content_type)
    limit = _limit(frame_max, exchange, ev0, mode, mandatory)
    kind = data.draw(st.sampled_from(["empty", "small", "limit"]), label="body")
    if kind == "empty":
        body = b""
    elif kind == "small":
        body = data.draw(st.binary(max_size=300), label="small body")
    else:
        size = limit + data.draw(st.integers(-2, 2), label="delta")
        body = _bytes(size, data.draw(st.integers(0, 2**32), label="seed"))
    ev = Outgoing(routing_key, body, True, message_id, content_type=content_type)
    theirs = py_amqp_publish(frame_max, channel, exchange, ev, mode, mandatory)
    word = framing.shortstr(exchange)
    assert word is not None
    parts: list[bytes] = [b"before"]
    size = framing.frame_publish(parts, channel, word, ev, mode, mandatory, frame_max)
    if len(body) > limit:
        assert (size, parts) == (0, [b"before"])
        assert len(theirs) > 1  # py-amqp's multi-frame path frames it instead
        return
    ours = b"".join(parts[1:])
    assert len(theirs) == 1  # py-amqp's single-buffer path, which ours copies
    assert ours == theirs[0]
    assert size == len(ours)
    args, props, got = _decode_publish(ours, channel)
    assert args == [0, exchange, routing_key, mandatory, False]
    expected = {"delivery_mode": mode, "message_id": message_id}
    if content_type is not None:
        expected["content_type"] = content_type
    assert props == expected
    assert got == body


_EVENT = st.tuples(
    st.builds(Outgoing, routing_key=SHORTSTR, body=st.binary(max_size=200),
              critical=st.booleans(), message_id=SHORTSTR,
              content_type=st.one_of(st.just(JSON), st.none(), SHORTSTR)),
    st.sampled_from([1, 2]),
    st.booleans(),
)


@FAST
@given(events=st.lists(_EVENT, min_size=1, max_size=4), channel=st.integers(1, 65535),
       exchange=SHORTSTR)
def test_batched_publishes_are_py_amqps_publishes_back_to_back(
    events: list[tuple[Outgoing, int, bool]], channel: int, exchange: str
) -> None:
    """Several publishes framed into one parts list and sent with write_frames are one
    write of exactly py-amqp's per-publish writes concatenated, counted once in
    ``bytes_sent`` (py-amqp's heartbeat check reads it)."""
    parts: list[bytes] = []
    total = 0
    word = framing.shortstr(exchange)
    assert word is not None
    for ev, mode, mandatory in events:
        size = framing.frame_publish(parts, channel, word, ev, mode, mandatory, 131072)
        assert size > 0
        total += size
    theirs = b"".join(b"".join(py_amqp_publish(131072, channel, exchange, ev, mode, mandatory))
                      for ev, mode, mandatory in events)
    writes: list[bytes] = []
    conn = SimpleNamespace(transport=SimpleNamespace(write=writes.append), bytes_sent=7)
    framing.write_frames(conn, parts)
    assert writes == [theirs]
    assert total == len(theirs)
    assert conn.bytes_sent == 8


@FAST
@given(headers=HEADERS, routing_key=SHORTSTR)
def test_publish_with_headers_is_left_to_py_amqp(headers: dict[str, Any],
                                                 routing_key: str) -> None:
    """An event with application headers (even ``{}``, which py-amqp still sends as an
    empty table) is not framed here: frame_publish appends nothing and returns 0."""
    ev = Outgoing(routing_key, b"{}", True, "id", headers=headers)
    parts: list[bytes] = []
    assert framing.frame_publish(parts, 1, b"\x02ex", ev, 2, True, 131072) == 0
    assert parts == []
    assert len(b"".join(py_amqp_publish(131072, 1, "ex", ev, 2, True))) > 0


@pytest.mark.parametrize("field", ["routing_key", "message_id", "content_type"])
@pytest.mark.parametrize("value", OVER_LIMIT)
def test_over_long_short_strings_are_left_to_py_amqp(field: str, value: str) -> None:
    """A routing key, message id or content type over 255 utf-8 bytes is not framed here
    (0, nothing appended), and py-amqp's framing of it raises, so the caller gets an
    error rather than a corrupt frame; shortstr() refuses such an exchange name too."""
    fields: dict[str, Any] = {"routing_key": "k", "message_id": "m", "content_type": JSON}
    fields[field] = value
    ev = Outgoing(fields["routing_key"], b"x", True, fields["message_id"],
                  content_type=fields["content_type"])
    parts: list[bytes] = []
    assert framing.frame_publish(parts, 1, b"\x02ex", ev, 2, True, 131072) == 0
    assert parts == []
    with pytest.raises(struct.error):
        py_amqp_publish(131072, 1, "ex", ev, 2, True)
    assert framing.shortstr(value) is None


# -- 2. reading frames and assembling deliveries ---------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    deliveries=st.lists(st.tuples(DELIVER_ARGS, PROPERTIES), min_size=1, max_size=3),
    channel=st.integers(1, 65535),
    frame_max=st.sampled_from([4096, 4104, 8192, 131072]),
    read_ahead=st.booleans(),
    data=st.data(),
)
def test_reader_and_assembler_give_back_py_amqps_deliveries(
    deliveries: list[tuple[Args, dict[str, Any]]], channel: int, frame_max: int,
    read_ahead: bool, data: st.DataObject,
) -> None:
    """Deliveries py-amqp framed (basic.deliver, content header with any basic
    properties, the body over as many body frames as frame_max needs), received in
    chunks cut anywhere (one byte at a time, inside frame headers, before end octets,
    at random; the first chunk possibly already in py-amqp's read buffer): FrameReader
    cuts out exactly the frames py-amqp's own read_frame does, and DeliverAssembler puts
    together the consumer tag, delivery tag, redelivered bit, exchange, routing key,
    properties and body that were sent, as py-amqp's frame handler does."""
    sent: list[Delivery] = []
    stream = b""
    for args, props in deliveries:
        body = draw_body(data, frame_max)
        sent.append((args, props, body))
        stream += py_amqp_deliver(frame_max, channel, args, props, body)
    chunks = cut(stream, draw_cuts(data, stream))
    transport = fake_transport(chunks, read_ahead)
    reader = framing.FrameReader(transport)
    assert transport._read_buffer == b""  # taken over

    theirs = py_amqp_read_frames(stream)
    ours = [reader.read_frame() for _ in theirs]
    assert ours == theirs
    assert reader.frame() is None and transport.sock.drained
    assert reader.buf[reader.pos :] == b""
    with pytest.raises(TimeoutError):  # nothing more: as py-amqp's socket timeout
        reader.read_frame()

    assert assemble(ours) == sent
    assert py_amqp_assemble(theirs) == sent


def test_reader_returns_a_frame_only_once_its_end_octet_is_in() -> None:
    """Fed one byte at a time, ``frame()`` gives nothing for every proper prefix of a
    frame (a header alone, the payload without its end octet) and the frame at its last
    byte; the next frame's first bytes stay buffered."""
    stream = py_amqp_deliver(4096, 3, ("c", 1, False, "e", "k"), {"message_id": "m"}, b"x" * 5)
    frames = split_frames(stream)
    reader = framing.FrameReader(SimpleNamespace(_read_buffer=b"", sock=None))
    got: list[Frame] = []
    ends = {end for _, end in frame_bounds(stream)}
    for i in range(len(stream)):
        reader._add(stream[i : i + 1])
        frame = reader.frame()
        if i in ends:
            assert frame is not None
            got.append(frame)
            assert reader.frame() is None
        else:
            assert frame is None, f"a frame returned at byte {i}, before its end octet"
    assert got == frames


def _drain_stream(data: st.DataObject) -> tuple[bytes, list[Delivery], list[Frame], Frame]:
    """Frames on a link's connection: heartbeats, deliveries on channel 1 (one with an
    ack and another channel's delivery between its content frames), acks on the confirm
    channel 2, a consume-ok on 1 and a delivery on 3 (py-amqp's)."""
    frame_max = data.draw(st.sampled_from([4096, 8192]), label="frame_max")

    def delivery(ch: int) -> tuple[Delivery, list[bytes]]:
        args = data.draw(DELIVER_ARGS, label="args")
        props = data.draw(PROPERTIES, label="properties")
        body = draw_body(data, frame_max)
        raw = py_amqp_deliver(frame_max, ch, args, props, body)
        return (args, props, body), [raw[a : b + 1] for a, b in frame_bounds(raw)]

    def ack(tag: int, multiple: bool) -> bytes:
        return b"".join(py_amqp_writes(frame_max, 2, spec.Basic.Ack,
                                       dumps("Lb", (tag, multiple)), None))

    first, first_frames = delivery(1)
    second, second_frames = delivery(1)
    _, other_frames = delivery(3)
    consume_ok = b"".join(py_amqp_writes(frame_max, 1, spec.Basic.ConsumeOk,
                                         dumps("s", ("ctag",)), None))
    ack1, ack2 = ack(2**40, False), ack(7, True)
    pieces = [_HEARTBEAT, *first_frames, ack1, consume_ok, *other_frames,
              second_frames[0], second_frames[1], ack2, *other_frames, *second_frames[2:],
              _HEARTBEAT]
    stream = b"".join(pieces)
    return stream, [first, second], split_frames(stream), split_frames(consume_ok)[0]


class _Channel(AbstractChannel):
    """py-amqp's channel base (its ``_pending`` and ``is_closing``), without listeners."""

    def _setup_listeners(self) -> None:
        pass


@FAST
@given(data=st.data(), confirm_state=st.sampled_from(["free", "waiting", "closing"]))
def test_drain_frames_routes_deliveries_acks_and_the_rest(data: st.DataObject,
                                                          confirm_state: str) -> None:
    """drain_frames over a FrameReader, the bytes arriving in bursts cut anywhere: the
    deliveries on the deliver channel come out whole and in order (frames of other
    channels may sit between their content frames), basic.acks on the confirm channel
    go to on_ack as (tag, multiple) unless py-amqp waits for one or the channel is
    closing, and every other frame reaches py-amqp's on_inbound_frame in order; each
    frame handled here counts once in ``bytes_recv`` as py-amqp's handler counts it."""
    stream, sent, frames, consume_ok = _drain_stream(data)
    chunks = cut(stream, draw_cuts(data, stream))
    n_bursts = data.draw(st.integers(1, max(1, len(chunks))), label="bursts")
    step = -(-len(chunks) // n_bursts)
    sock = ChunkSocket([chunks[i : i + step] for i in range(0, len(chunks), step)])
    transport = SimpleNamespace(_read_buffer=b"", sock=sock, connected=True)
    reader = framing.FrameReader(transport)
    to_py_amqp: list[Frame] = []
    conn = SimpleNamespace(on_inbound_frame=to_py_amqp.append, bytes_recv=0)
    confirm = _Channel(SimpleNamespace(channels={}), 2)
    if confirm_state == "waiting":
        confirm._pending[spec.Basic.Ack] = object()
    confirm.is_closing = confirm_state == "closing"
    asm = framing.DeliverAssembler()
    delivered: list[Delivery] = []
    acks: list[tuple[int, bool]] = []

    def on_deliver(frame: Frame) -> None:
        got = asm.feed(frame)
        if got is not None:
            delivered.append(got)

    while sock.release():
        framing.drain_frames(conn, reader, lambda: False, deliver_id=1, assembler=asm,
                             on_deliver=on_deliver, confirm=confirm,
                             on_ack=lambda tag, multiple: acks.append((tag, multiple)))
    assert sock.drained and reader.frame() is None
    assert delivered == sent
    ack_frames = [f for f in frames if f[1] == 2]
    own_acks = confirm_state == "free"
    assert acks == ([(2**40, False), (7, True)] if own_acks else [])
    expected = [f for f in frames
                if not (f[1] == 1 and f != consume_ok) and not (own_acks and f[1] == 2)]
    assert to_py_amqp == expected
    own = len(frames) - len(expected)
    assert conn.bytes_recv == own
    assert own == sum(f[1] == 1 for f in frames) - 1 + (len(ack_frames) if own_acks else 0)


def test_drain_frames_stops_when_enough() -> None:
    """drain_frames checks ``enough()`` before each frame: it stops after the first
    delivery, leaves the second buffered, and a later call delivers it."""
    one = py_amqp_deliver(4096, 1, ("c", 1, False, "e", "k"), {}, b"a")
    two = py_amqp_deliver(4096, 1, ("c", 2, True, "e", "k"), {}, b"b")
    sock = ChunkSocket([[one + two]])
    sock.release_all()
    reader = framing.FrameReader(SimpleNamespace(_read_buffer=b"", sock=sock, connected=True))
    conn = SimpleNamespace(on_inbound_frame=lambda frame: pytest.fail(f"to py-amqp: {frame}"),
                           bytes_recv=0)
    asm = framing.DeliverAssembler()
    delivered: list[Delivery] = []

    def on_deliver(frame: Frame) -> None:
        got = asm.feed(frame)
        if got is not None:
            delivered.append(got)

    framing.drain_frames(conn, reader, lambda: len(delivered) >= 1, deliver_id=1,
                         assembler=asm, on_deliver=on_deliver)
    assert [d[0][1] for d in delivered] == [1]
    framing.drain_frames(conn, reader, lambda: False, deliver_id=1, assembler=asm,
                         on_deliver=on_deliver)
    assert [d[0][1] for d in delivered] == [1, 2]
    assert conn.bytes_recv == 6


# -- malformed input -------------------------------------------------------------------


@FAST
@given(deliveries=st.lists(st.tuples(DELIVER_ARGS, PROPERTIES), min_size=1, max_size=2),
       bad=st.integers(0, 255).filter(lambda b: b != 0xCE), data=st.data())
def test_wrong_frame_end_octet_raises(deliveries: list[tuple[Args, dict[str, Any]]],
                                      bad: int, data: st.DataObject) -> None:
    """A frame whose end octet is not 0xCE raises py-amqp's UnexpectedFrame with
    py-amqp's message, after exactly the frames before it, however the bytes were cut;
    asked again, the reader raises again (it never skips the bad frame)."""
    stream = b"".join(py_amqp_deliver(4096, 1, args, props, draw_body(data, 4096))
                      for args, props in deliveries)
    bounds = frame_bounds(stream)
    index = data.draw(st.integers(0, len(bounds) - 1), label="bad frame")
    end = bounds[index][1]
    broken = stream[:end] + bytes((bad,)) + stream[end + 1 :]
    transport = fake_transport(cut(broken, draw_cuts(data, broken)), data.draw(st.booleans()))
    reader = framing.FrameReader(transport)
    good = [reader.read_frame() for _ in range(index)]
    assert good == split_frames(stream[: bounds[index][0]])
    message = f"Received frame_end {bad:#04x} while expecting 0xce"
    with pytest.raises(UnexpectedFrame, match=message):
        reader.read_frame()
    with pytest.raises(UnexpectedFrame):
        reader.frame()
    with pytest.raises(UnexpectedFrame, match=message):
        py_amqp_read_frames(broken)


_DELIVER = (1, 1, framing.BASIC_DELIVER + dumps("sLbss", ("c", 1, False, "e", "k")))
_HEADER5 = (2, 1, struct.pack(">HHQ", 60, 0, 5) + b"\x00\x00")
_BODY2 = (3, 1, b"ab")


@pytest.mark.parametrize(
    "frames",
    [
        [_DELIVER, _BODY2],  # body before the header
        [_DELIVER, _DELIVER],  # a method frame instead of the header
        [_DELIVER, (4, 1, b"")],  # a type that does not exist
        [_DELIVER, _HEADER5, _HEADER5],  # a second header
        [_DELIVER, _HEADER5, _DELIVER],  # a method frame before the body is complete
        [_DELIVER, _HEADER5, _BODY2, (9, 1, b"")],
    ],
    ids=["body-first", "method-for-header", "type-4", "two-headers", "method-in-body",
         "type-9-in-body"],
)
def test_unexpected_frame_type_raises(frames: list[Frame]) -> None:
    """A frame of the wrong type during a delivery raises py-amqp's UnexpectedFrame, with
    the message py-amqp's frame handler raises for the same frames."""
    asm = framing.DeliverAssembler()
    with pytest.raises(UnexpectedFrame) as ours:
        for frame in frames:
            assert asm.feed(frame) is None
    with pytest.raises(UnexpectedFrame) as theirs:
        py_amqp_assemble(frames)
    assert str(ours.value) == str(theirs.value)


@FAST
@given(args=DELIVER_ARGS, data=st.data())
def test_truncated_deliver_arguments_read_as_py_amqp_reads_them(args: Args,
                                                               data: st.DataObject) -> None:
    """basic.deliver's arguments cut short anywhere: the own parser raises where
    py-amqp's ``loads('sLbss')`` raises, and otherwise reads the same values (a short
    string cut by the frame's end reads short in both)."""
    payload = framing.BASIC_DELIVER + dumps("sLbss", args)
    n = data.draw(st.integers(4, len(payload)), label="length")
    try:
        theirs: list[Any] | None = loads("sLbss", payload[:n], 4)[0]
    except Exception:
        theirs = None
    try:
        ours: list[Any] | None = list(framing._deliver_args(payload[:n]))
    except Exception:
        ours = None
    assert ours == theirs


# -- the socket side of the reader, on a real py-amqp TCPTransport -----------------------


def _tcp_transport(sock: socket.socket) -> Any:
    """py-amqp's plain TCP transport over ``sock``, set up as its connect() would."""
    t = amqp.transport.TCPTransport("127.0.0.1:5672")
    t.sock = sock
    t._setup_transport()
    t.connected = True
    return t


def test_reader_takes_over_py_amqps_read_ahead_and_socket() -> None:
    """On py-amqp's own TCPTransport: a frame py-amqp half read before a timeout sits in
    its private ``_read_buffer``; install_reader moves it into the FrameReader, replaces
    the transport's read_frame, and the rest of the frame completes it. Then, as py-amqp:
    a timeout with nothing there, fill_nowait False when nothing arrived and True when
    something did, and the peer's close raises OSError and marks it disconnected."""
    a, b = socket.socketpair()
    try:
        a.settimeout(0.05)
        t = _tcp_transport(a)
        frame = py_amqp_deliver(4096, 1, ("c", 9, True, "e", "k"), {}, b"")
        first = split_frames(frame)
        b.sendall(frame[:10])  # the method frame's header and 3 payload bytes
        with pytest.raises(socket.timeout):
            t.read_frame()
        assert t._read_buffer == frame[:10], "py-amqp no longer keeps a partial frame there"
        reader = framing.install_reader(SimpleNamespace(transport=t))
        assert reader is not None
        assert t._read_buffer == b""
        assert t.read_frame == reader.read_frame
        b.sendall(frame[10:])
        assert [t.read_frame(), t.read_frame()] == first
        with pytest.raises(TimeoutError):
            t.read_frame()
        assert reader.fill_nowait() is False
        b.sendall(_HEARTBEAT)
        select.select([a], [], [], 5)
        assert reader.fill_nowait() is True
        assert reader.frame() == (8, 0, b"")
        b.close()
        with pytest.raises(OSError, match="Server unexpectedly closed connection"):
            reader.fill_nowait()
        assert t.connected is False
    finally:
        a.close()
        b.close()


def test_fill_nowait_on_a_blocking_socket_uses_msg_dontwait() -> None:
    """With no timeout on the socket (the owner link's), fill_nowait reads with
    MSG_DONTWAIT: False at once when nothing is there, True and the frame when it is."""
    a, b = socket.socketpair()
    try:
        a.settimeout(None)
        t = _tcp_transport(a)
        reader = framing.install_reader(SimpleNamespace(transport=t))
        assert reader is not None
        assert reader.fill_nowait() is False
        b.sendall(_HEARTBEAT * 2)
        select.select([a], [], [], 5)
        assert reader.fill_nowait() is True
        assert [reader.frame(), reader.frame(), reader.frame()] == [(8, 0, b"")] * 2 + [None]
    finally:
        a.close()
        b.close()


def test_install_reader_only_on_plain_tcp() -> None:
    """install_reader leaves py-amqp's TLS transport (and anything else) alone: None."""
    assert framing.install_reader(SimpleNamespace(transport=None)) is None
    tls = amqp.transport.SSLTransport("127.0.0.1:5671")
    assert framing.install_reader(SimpleNamespace(transport=tls)) is None


class _FailingSocket:
    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.errors:
            raise self.errors.pop(0)
        return _HEARTBEAT


@pytest.mark.parametrize(
    ("error", "connected"),
    [(OSError(errno.ECONNRESET, "reset"), False), (OSError(errno.EPIPE, "pipe"), False),
     (OSError(errno.ENOENT, "enoent"), True)],
    ids=["ECONNRESET", "EPIPE", "ENOENT"],
)
def test_socket_errors_mark_the_transport_as_py_amqp_does(error: OSError,
                                                          connected: bool) -> None:
    """A socket error reaches the caller; the transport stays connected only for the
    errnos py-amqp's _UNAVAIL lists (as py-amqp's own read_frame decides)."""
    transport = SimpleNamespace(_read_buffer=b"", sock=_FailingSocket(error), connected=True)
    reader = framing.FrameReader(transport)
    with pytest.raises(OSError) as raised:
        reader.read_frame()
    assert raised.value is error
    assert transport.connected is connected
    assert (error.errno in amqp.transport._UNAVAIL) is connected


def test_interrupted_and_would_block_reads() -> None:
    """An interrupted recv is retried; a blocking read that would block is a timeout
    (what py-amqp raises), a MSG_DONTWAIT one is 'nothing there'."""
    transport = SimpleNamespace(_read_buffer=b"", sock=_FailingSocket(InterruptedError()),
                                connected=True)
    assert framing.FrameReader(transport).read_frame() == (8, 0, b"")
    transport.sock = _FailingSocket(BlockingIOError(errno.EAGAIN, "again"))
    with pytest.raises(TimeoutError):
        framing.FrameReader(transport).read_frame()
    transport.sock = _FailingSocket(BlockingIOError(errno.EAGAIN, "again"))
    transport.sock.gettimeout = lambda: None  # type: ignore[attr-defined]
    assert framing.FrameReader(transport).fill_nowait() is False
    assert transport.connected is True


# -- 3. the py-amqp the fast paths were verified against --------------------------------


def test_installed_py_amqp_is_a_verified_release() -> None:
    """The installed py-amqp is one whose private parts framing.py was checked against
    (VERIFIED_PY_AMQP): any other release fails here until someone re-checks them."""
    installed = amqp.__version__
    if installed in framing.VERIFIED_PY_AMQP:
        return
    privates = "\n".join(f"  - {p}" for p in framing.PY_AMQP_PRIVATES)
    pytest.fail(
        f"py-amqp {installed} is installed, but brama_mq/transport/amqp/framing.py's fast "
        f"paths were verified only against py-amqp {', '.join(framing.VERIFIED_PY_AMQP)}.\n"
        f"They read these private parts of py-amqp; re-check each in amqp {installed}'s "
        f"transport.py, method_framing.py, serialization.py and abstract_channel.py:\n"
        f"{privates}\n"
        f"Then run tests/test_framing.py and tests/test_subscribe_wire.py (broker) on "
        f"py-amqp {installed}; when they pass, add {installed!r} to VERIFIED_PY_AMQP in "
        f"framing.py and widen the amqp range in pyproject.toml. If a part changed, fix "
        f"framing.py first (its import-time checks only cover the publish bytes and the "
        f"basic.deliver arguments).",
        pytrace=False,
    )


def test_fast_paths_are_on() -> None:
    """The import-time self-checks pass on the installed py-amqp: the batched publish
    framing (BATCHED_FRAMING) and the own basic.deliver parsing (OWN_DELIVER) are on, so
    the links do not fall back to py-amqp's slower paths without anyone noticing."""
    assert framing._framing_matches(), "frame_publish no longer writes py-amqp's bytes"
    assert framing._deliver_parsing_matches(), "_deliver_args no longer reads as py-amqp"
    assert framing.BATCHED_FRAMING is True
    assert framing.OWN_DELIVER is True


def test_mirrored_py_amqp_constants() -> None:
    """The constants framing.py copies from py-amqp still equal py-amqp's: the message
    overhead that picks frame_writer's single-buffer path, and the errnos after which a
    transport stays connected."""
    assert framing._FRAME_OVERHEAD == FRAME_OVERHEAD
    assert set(amqp.transport._UNAVAIL) == framing._UNAVAIL
    assert spec.Basic.Deliver == (60, 60) and spec.Basic.Ack == (60, 80)
    assert struct.pack(">HH", *spec.Basic.Deliver) == framing.BASIC_DELIVER


def test_read_after_close_raises_oserror_as_py_amqp() -> None:
    """A read on a transport already closed (its ``sock`` None) raises OSError, as
    py-amqp's own read_frame does there (EBADF) and as fill_nowait and wait do: the
    links treat OSError as a lost connection, an AttributeError would escape them."""
    for own in (False, True):
        a, b = socket.socketpair()
        try:
            t = _tcp_transport(a)
            reader = framing.install_reader(SimpleNamespace(transport=t)) if own else None
            t.close()
            with pytest.raises(OSError):
                t.read_frame()
            if reader is not None:
                with pytest.raises(OSError):
                    reader.fill_nowait()
                with pytest.raises(OSError):
                    reader.wait(0)
        finally:
            a.close()
            b.close()
