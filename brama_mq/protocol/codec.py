"""JSON bytes <-> wire models, with errors that say which field was wrong.

Decoding is defensive because commands come from any program on the broker: the body is
size-limited before parsing, nesting depth is limited after, and every failure is one
:class:`ProtocolError` whose ``field``/``value`` end up in the dead-letter header.
Event encoding skips pydantic entirely: the owner encodes every event it publishes.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from brama_mq.core import events as core_events
from brama_mq.core.routing import check_names, encode_scope
from brama_mq.errors import InvalidNameError, ProtocolError
from brama_mq.protocol.models import (
    COMMAND_OPS,
    CONNECTION_OPTIONAL_OPS,
    PROTOCOL_VERSION,
    QUERY_OPS,
    Command,
    Event,
    Reply,
)

__all__ = [
    "CONTENT_TYPE",
    "MAX_BYTES",
    "MAX_DEPTH",
    "command_body",
    "decode_command",
    "decode_event",
    "decode_reply",
    "encode_command",
    "encode_event",
    "encode_reply",
    "make_command",
    "new_command_id",
    "report_body",
]

CONTENT_TYPE: Final = "application/json"
#: Default limit on a message body, in bytes.
MAX_BYTES: Final = 65536
#: Default limit on nested arrays/objects (the top-level object is depth 1).
MAX_DEPTH: Final = 32

M = TypeVar("M", bound=BaseModel)

# One encoder, built once: json.dumps with non-default options builds a new one per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _make_fast_encode() -> Callable[[Any], str]:
    """``_ENCODER.encode`` without its per-call setup, when CPython's C encoder exists.

    ``JSONEncoder.encode`` builds a new C encoder object on every call, which is about a
    third of the cost of a small event. This builds it once (no circular-reference
    check: engine events are trees) and falls back to the public path if the private
    hook is missing or does not behave like the public encoder.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        chunks = make(
            None,
            _ENCODER.default,
            json.encoder.encode_basestring,
            None,
            ":",
            ",",
            False,
            False,
            False,
        )

        def fast(obj: Any) -> str:
            return "".join(chunks(obj, 0))

        sample = {"a": [1, None, True, 'é\n"', 2.5], "b": {"c": -3}}
        if fast(sample) != _ENCODER.encode(sample):
            return _ENCODER.encode
    except Exception:
        return _ENCODER.encode
    return fast


_encode: Final = _make_fast_encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: ``json.loads(text, parse_constant=...)`` builds a new decoder per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _check_content_type(content_type: str | None) -> None:
    if content_type is None or content_type == CONTENT_TYPE:
        return
    media, _, params = content_type.partition(";")
    ok = media.strip().lower() == CONTENT_TYPE
    if ok and params:
        key, _, charset = params.partition("=")
        if key.strip().lower() == "charset":
            ok = charset.strip().strip('"').lower() in ("utf-8", "utf8")
    if not ok:
        raise ProtocolError(
            f"unsupported content type {content_type!r} (expected {CONTENT_TYPE})",
            field="content_type",
            value=content_type,
        )


def _shallow(obj: dict[str, Any]) -> bool:
    """Whether ``obj`` nests at most one level below the top (depth <= 2): a cheap check
    that spares the common command the full walk of :func:`_depth`."""
    for value in obj.values():
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        for child in value:
            if isinstance(child, (dict, list)):
                return False
    return True


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj``, or ``limit + 1`` as soon as it is known to exceed it."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return deepest


def _load_object(
    body: bytes | bytearray | memoryview | str,
    content_type: str | None,
    max_bytes: int,
    max_depth: int,
    what: str,
) -> dict[str, Any]:
    """Bytes -> a JSON object, or :class:`ProtocolError` (field ``body``/``content_type``)."""
    _check_content_type(content_type)
    if isinstance(body, str):
        text = body
        size = len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))
    elif isinstance(body, (bytes, bytearray, memoryview)):
        size = len(body) if not isinstance(body, memoryview) else body.nbytes
        text = ""
    else:
        raise ProtocolError(
            f"{what} body must be bytes or str, not {type(body).__name__}",
            field="body",
            value=type(body).__name__,
        )
    if size > max_bytes:
        raise ProtocolError(
            f"{what} body is {size} bytes, over the limit of {max_bytes}", field="body", value=size
        )
    if not isinstance(body, str):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f"{what} body is not UTF-8: {exc.reason} at byte {exc.start}",
                field="body",
                value=bytes(body[exc.start : exc.end]),
            ) from None
    try:
        if text.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"{what} body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            field="body",
            value=text[max(0, exc.pos - 20) : exc.pos + 20],
        ) from None
    except ValueError as exc:  # NaN / Infinity
        raise ProtocolError(f"{what} body is not valid JSON: {exc}", field="body") from None
    except RecursionError:
        raise ProtocolError(
            f"{what} body is nested deeper than {max_depth} levels", field="body"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"{what} body must be a JSON object, not {type(obj).__name__}",
            field="body",
            value=obj if isinstance(obj, (int, float, str, bool)) or obj is None else None,
        )
    if max_depth >= 2 and _shallow(obj):
        return obj
    depth = _depth(obj, max_depth)
    if depth > max_depth:
        raise ProtocolError(
            f"{what} body is nested deeper than {max_depth} levels", field="body", value=depth
        )
    return obj


def _validate(model: type[M], obj: dict[str, Any], what: str) -> M:
    """Validate, turning the first pydantic error into a :class:`ProtocolError`."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = first.get("loc", ())
        field = ".".join(str(part) for part in loc) or None
        value = None if first["type"] == "missing" else first.get("input")
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        if first["type"] == "missing":
            msg = "is missing"
        raise ProtocolError(
            f"invalid {what}: {field or 'body'}: {msg}{more}", field=field, value=value
        ) from None


def _check_wire_version(obj: dict[str, Any], what: str) -> None:
    """``v`` is required on the wire (the model defaults it only for Python callers)."""
    if "v" not in obj:
        raise ProtocolError(f"invalid {what}: v: is missing", field="v")
    v = obj["v"]
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError(
            f"invalid {what}: v: unsupported version {v!r} (this side speaks {PROTOCOL_VERSION})",
            field="v",
            value=v,
        )


def _dump(model: BaseModel) -> bytes:
    try:
        return model.model_dump_json().encode("utf-8")
    except ValueError as exc:  # PydanticSerializationError, e.g. a lone surrogate
        raise ProtocolError(
            f"{type(model).__name__} cannot be encoded as JSON: {exc}", field=None
        ) from exc


_COMMAND_KEYS: Final = frozenset(Command.model_fields)
_ALL_OPS: Final = COMMAND_OPS | QUERY_OPS
_set_attr: Final = object.__setattr__


def _fast_command(obj: dict[str, Any]) -> Command | None:
    """The Command pydantic would validate from ``obj``, built without it, or None.

    Covers well-formed commands without unknown fields, which is nearly every command
    the owner sees; it checks exactly what the model's types and validators check and
    returns None on anything else, so :func:`_validate` reports errors as before.
    ``_FAST_COMMANDS`` (checked at import) turns it off if the model's internals change.
    """
    if not _COMMAND_KEYS.issuperset(obj):
        return None  # unknown fields: kept as extras by the model
    v = obj.get("v")
    op = obj.get("op")
    ident = obj.get("id")
    ts = obj.get("ts")
    if (
        type(v) is not int
        or v != PROTOCOL_VERSION
        or type(op) is not str
        or op not in _ALL_OPS
        or type(ident) is not str
        or not ident
        or type(ts) is not int
        or ts < 0
    ):
        return None
    scope = obj.get("scope")
    connection = obj.get("connection")
    reason = obj.get("reason")
    if reason is not None and type(reason) is not str:
        return None
    options = obj.get("options")
    if options is None:
        if "options" in obj:
            return None  # null is not a dict
        options = {}
    elif type(options) is not dict:
        return None
    else:
        options = dict(options)
    try:
        if scope is not None:
            if type(scope) is not str:
                return None
            encode_scope(scope)
        if connection is None:
            if op not in CONNECTION_OPTIONAL_OPS:
                return None
        elif type(connection) is not str:
            return None
        else:
            check_names(scope, connection)
    except InvalidNameError:
        return None
    command = Command.__new__(Command)
    _set_attr(
        command,
        "__dict__",
        {
            "v": v,
            "op": op,
            "scope": scope,
            "connection": connection,
            "id": ident,
            "ts": ts,
            "reason": reason,
            "options": options,
        },
    )
    _set_attr(command, "__pydantic_fields_set__", set(obj))
    _set_attr(command, "__pydantic_extra__", {})
    _set_attr(command, "__pydantic_private__", None)
    return command


def _fast_commands_match() -> bool:
    """Whether :func:`_fast_command` builds what ``Command.model_validate`` builds."""
    samples: list[dict[str, Any]] = [
        {"v": 1, "op": "failure", "scope": "s", "connection": "c.1", "id": "i", "ts": 5,
         "reason": "r", "options": {"lease": "x", "n": [1, {"a": None}]}},
        {"v": 1, "op": "success", "connection": "c", "id": "i", "ts": 0},
        {"v": 1, "op": "configure", "scope": None, "id": "i", "ts": 1, "options": {}},
        {"v": 1, "op": "snapshot", "connection": None, "id": "i", "ts": 1, "reason": None},
    ]
    try:
        for sample in samples:
            fast = _fast_command(dict(sample))
            slow = Command.model_validate(dict(sample))
            if (
                fast is None
                or fast != slow
                or fast.model_fields_set != slow.model_fields_set
                or fast.model_extra != slow.model_extra
                or fast.__pydantic_private__ != slow.__pydantic_private__
                or fast.model_dump_json() != slow.model_dump_json()
                or repr(fast) != repr(slow)
            ):
                return False
        return True
    except Exception:
        return False


_FAST_COMMANDS: Final = _fast_commands_match()


def encode_command(cmd: Command) -> bytes:
    """Compact UTF-8 JSON of a command, unknown extra fields included."""
    return _dump(cmd)


def decode_command(
    body: bytes | bytearray | memoryview | str,
    content_type: str | None = CONTENT_TYPE,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Command:
    """A command from a message body; :class:`ProtocolError` names the bad field."""
    obj = _load_object(body, content_type, max_bytes, max_depth, "command")
    _check_wire_version(obj, "command")
    if _FAST_COMMANDS:
        command = _fast_command(obj)
        if command is not None:
            return command
    return _validate(Command, obj, "command")


def encode_event(event: core_events.Event | Event | Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of an event, built straight from a dict (no validation).

    The engine builds events that are right by construction; validating each one again
    on the owner's hot path would cost more than the rest of the encoding.
    """
    try:
        if type(event) is core_events.Event:
            return _encode(
                {
                    "event": event.event,
                    "timestamp": event.timestamp,
                    "connection": event.connection,
                    "scope": event.scope,
                    "id": event.id,
                    "seq": event.seq,
                    "epoch": event.epoch,
                    "data": event.data,
                }
            ).encode("utf-8")
        if isinstance(event, Event):
            return _dump(event)
        if isinstance(event, core_events.Event):
            return _encode(event.to_dict()).encode("utf-8")
        return _encode(dict(event)).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # incl. UnicodeEncodeError
        raise ProtocolError(f"event cannot be encoded as JSON: {exc}", field="data") from exc


def decode_event(
    body: bytes | bytearray | memoryview | str,
    content_type: str | None = CONTENT_TYPE,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Event:
    """An event from a message body, validated (subscribers get untrusted input too)."""
    obj = _load_object(body, content_type, max_bytes, max_depth, "event")
    return _validate(Event, obj, "event")


def encode_reply(reply: Reply) -> bytes:
    """Compact UTF-8 JSON of an RPC reply."""
    return _dump(reply)


def decode_reply(
    body: bytes | bytearray | memoryview | str,
    content_type: str | None = CONTENT_TYPE,
    *,
    max_bytes: int = 16 * 1024 * 1024,
    max_depth: int = MAX_DEPTH,
) -> Reply:
    """An RPC reply. The default size limit is larger: a snapshot lists every breaker."""
    obj = _load_object(body, content_type, max_bytes, max_depth, "reply")
    _check_wire_version(obj, "reply")
    return _validate(Reply, obj, "reply")


def make_command(
    op: str,
    connection: str | None,
    scope: str | None = None,
    reason: str | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    now_ms: int,
    id: str | None = None,
) -> Command:
    """A validated command with ``v``, ``id`` (uuid4 hex when None) and ``ts`` filled in.

    The time is an argument, not a clock read, so callers and tests control it.
    Raises :class:`ProtocolError` like :func:`decode_command` does.
    """
    return _validate(
        Command,
        {
            "v": PROTOCOL_VERSION,
            "op": op,
            "connection": connection,
            "scope": scope,
            "id": uuid.uuid4().hex if id is None else id,
            "ts": now_ms,
            "reason": reason,
            "options": {} if options is None else dict(options),
        },
        "command",
    )


class _CommandIds:
    """Command ids without a uuid4 per command: a random prefix per process, then a
    counter (unique while the prefix is; a forked child draws a new prefix)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = uuid.uuid4().hex[:20] + "-"
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_IDS: Final = _CommandIds()
new_command_id: Final = _IDS.next
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDS.reset)


#: A JSON string literal of a str, exactly as :data:`_encode` writes strings.
_quote: Final = json.encoder.encode_basestring
#: ``(op, scope, connection)`` -> the body's head up to ``"id":`` (names checked).
_HEADS: dict[tuple[str, str | None, str | None], str] = {}
_HEADS_LIMIT: Final = 10_000


def _head(op: str, scope: str | None, connection: str | None) -> str:
    """The start of a command body, ``{"v":1,"op":…,"scope":…,"connection":…,"id":``,
    cached per ``(op, scope, connection)``, so a sender repeating a command checks its
    names once. Raises :class:`InvalidNameError` as ``check_names``; ``""`` (not cached)
    when only :func:`make_command` can say what is wrong with ``op``."""
    if connection is not None:
        check_names(scope, connection)
    else:
        encode_scope(scope)
    if (
        type(op) is not str
        or op not in _ALL_OPS
        or (connection is None and op not in CONNECTION_OPTIONAL_OPS)
    ):
        return ""
    head = (
        f'{{"v":{PROTOCOL_VERSION},"op":{_quote(op)},'
        f'"scope":{"null" if scope is None else _quote(scope)},'
        f'"connection":{"null" if connection is None else _quote(connection)},"id":'
    )
    if len(_HEADS) >= _HEADS_LIMIT:
        _HEADS.clear()
    _HEADS[(op, scope, connection)] = head
    return head


def _cached_head(op: str, scope: str | None, connection: str | None) -> str:
    """:func:`_head`, from the cache when this ``(op, scope, connection)`` was seen."""
    try:
        head = _HEADS.get((op, scope, connection))
    except TypeError:  # an unhashable argument: _head refuses it with the right error
        head = None
    return _head(op, scope, connection) if head is None else head


def _body(head: str, id_text: str, now_ms: int, reason_text: str, options_text: str) -> bytes:
    """A command body from its head (:func:`_head`) and the JSON of the other fields."""
    return (
        f'{head}{id_text},"ts":{now_ms},"reason":{reason_text},"options":{options_text}}}'
    ).encode()


def _options_json(options: Mapping[str, Any]) -> str:
    """``options`` as JSON when it is a dict with str keys (one ``lease`` or ``count``, the
    common case, written directly), else ``""``; TypeError/ValueError from the encoder."""
    if type(options) is not dict:
        return ""
    if len(options) == 1:
        ((key, value),) = options.items()
        if type(key) is not str:
            return ""
        if type(value) is str:
            return f"{{{_quote(key)}:{_quote(value)}}}"
        if type(value) is int:
            return f"{{{_quote(key)}:{value}}}"
        return _encode(options)
    for key in options:
        if type(key) is not str:
            return ""
    return _encode(options) if options else "{}"


def command_body(
    op: str,
    connection: str | None,
    scope: str | None = None,
    reason: str | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    now_ms: int,
    id: str | None = None,
) -> tuple[bytes, str]:
    """``(encode_command(make_command(...)), id)`` without building the pydantic model.

    The one command encoder of the senders: the client's calls and the outbox of
    outcome reports (:mod:`brama_mq.client.outbox`) both send what this returns. Names
    are checked first (:class:`InvalidNameError`, as ``check_names``, once per
    ``(op, scope, connection)``: see :func:`_head`); then, for the usual arguments
    (``reason`` a str or None, ``options`` None or a dict with str keys) this only
    writes JSON, in the model's field order; anything else, or anything the encoder
    refuses, goes through :func:`make_command`, so errors are the same. A test pins
    that both give the same JSON. ``id`` defaults to :func:`new_command_id`.
    """
    head = _cached_head(op, scope, connection)
    ident = new_command_id() if id is None else id
    if head and type(ident) is str and ident and type(now_ms) is int and now_ms >= 0:
        if reason is None:
            reason_text = "null"
        elif type(reason) is str:
            reason_text = _quote(reason)
        else:
            reason_text = ""
        if reason_text:
            try:
                opts = "{}" if options is None else _options_json(options)
                if opts:
                    # a drawn id is hex and a dash: nothing in it to escape
                    id_text = '"' + ident + '"' if id is None else _quote(ident)
                    return _body(head, id_text, now_ms, reason_text, opts), ident
            except (TypeError, ValueError, RecursionError):  # incl. a lone surrogate
                pass  # make_command / encode_command say what is wrong
    cmd = make_command(op, connection, scope, reason, options, now_ms=now_ms, id=ident)
    return encode_command(cmd), ident


def report_body(
    op: str,
    connection: str,
    scope: str | None,
    reason: str | None,
    *,
    now_ms: int,
    lease: str | None = None,
    count: int = 1,
    duration_ms: float | None = None,
    reporter: str | None = None,
) -> bytes:
    """:func:`command_body` of an outcome report (the guards' outbox), byte for byte,
    without building its options: ``options`` is ``{"lease": lease}`` with a lease,
    else ``{"count": count}`` when ``count != 1``, else empty. Same head cache, same
    layout (a test pins the equality); anything unusual goes through
    :func:`command_body`, so errors are the same. ``duration_ms`` and ``reporter``, when
    given, follow in the options (the owner checks them: a number >= 0, a name of 1..200
    characters); such a report goes through :func:`command_body` (still no pydantic)."""
    if duration_ms is not None or reporter is not None:
        extended: dict[str, Any] = (
            {"lease": lease} if lease else {"count": count} if count != 1 else {}
        )
        if duration_ms is not None:
            extended["duration_ms"] = duration_ms
        if reporter is not None:
            extended["reporter"] = reporter
        return command_body(op, connection, scope, reason, extended, now_ms=now_ms)[0]
    head = _cached_head(op, scope, connection)
    if (
        head
        and type(now_ms) is int
        and now_ms >= 0
        and (reason is None or type(reason) is str)
        and (lease is None or type(lease) is str)
        and type(count) is int
    ):
        if lease:
            opts = '{"lease":' + _quote(lease) + "}"
        elif count != 1:
            opts = f'{{"count":{count}}}'
        else:
            opts = "{}"
        reason_text = "null" if reason is None else _quote(reason)
        try:
            return _body(head, f'"{new_command_id()}"', now_ms, reason_text, opts)
        except UnicodeEncodeError:  # a lone surrogate: command_body says what is wrong
            pass
    options: dict[str, Any] | None = (
        {"lease": lease} if lease else {"count": count} if count != 1 else None
    )
    return command_body(op, connection, scope, reason, options, now_ms=now_ms)[0]
