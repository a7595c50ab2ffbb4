"""Wire models and the JSON codec (section 5 of the wire contract)."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import brama_mq.protocol as protocol
import brama_mq.protocol.codec as codec
from brama_mq.core.events import EVENT_TYPES
from brama_mq.core.events import Event as CoreEvent
from brama_mq.errors import ProtocolError
from brama_mq.protocol import (
    COMMAND_OPS,
    CONNECTION_OPTIONAL_OPS,
    PROTOCOL_VERSION,
    QUERY_OPS,
    Command,
    Event,
    Reply,
    decode_command,
    decode_event,
    decode_reply,
    encode_command,
    encode_event,
    encode_reply,
    make_command,
)


def _valid_name(value: str) -> bool:
    return bool(value) and not any(
        unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") for c in value
    )


names = st.text(min_size=1, max_size=30).filter(_valid_name)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
FIELDS = {"v", "op", "connection", "scope", "id", "ts", "reason", "options"}
extra_fields = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in FIELDS), json_values, max_size=3
)


def good() -> dict[str, Any]:
    return {
        "v": 1,
        "op": "failure",
        "connection": "payment_api",
        "scope": "payments",
        "id": "8c1e",
        "ts": 1630000000000,
        "reason": "timeout",
        "options": {},
    }


def test_exported_names() -> None:
    """The package exports exactly its documented public names."""
    assert set(protocol.__all__) == {
        "COMMAND_OPS",
        "CONNECTION_OPTIONAL_OPS",
        "CONTENT_TYPE",
        "MAX_BYTES",
        "MAX_DEPTH",
        "PROTOCOL_VERSION",
        "QUERY_OPS",
        "Command",
        "Event",
        "Op",
        "Reply",
        "command_body",
        "decode_command",
        "decode_event",
        "decode_reply",
        "encode_command",
        "encode_event",
        "encode_reply",
        "make_command",
        "new_command_id",
    }
    assert not COMMAND_OPS & QUERY_OPS
    assert {"configure", "snapshot"} == CONNECTION_OPTIONAL_OPS


def test_contract_example_decodes() -> None:
    """The command example of section 5 decodes field for field."""
    cmd = decode_command(json.dumps(good()).encode())
    assert (cmd.v, cmd.op, cmd.connection, cmd.scope) == (1, "failure", "payment_api", "payments")
    assert (cmd.id, cmd.ts, cmd.reason, cmd.options) == ("8c1e", 1630000000000, "timeout", {})


def test_python_construction_defaults_version_and_is_frozen() -> None:
    """Python callers may omit v; commands are values and cannot be changed in place."""
    cmd = Command(op="register", connection="api", id="i", ts=0)
    assert cmd.v == PROTOCOL_VERSION
    with pytest.raises(ValueError):
        cmd.op = "failure"


def test_optional_fields_default() -> None:
    """scope, reason and options may be left out."""
    body = {k: v for k, v in good().items() if k not in ("scope", "reason", "options")}
    cmd = decode_command(json.dumps(body))
    assert (cmd.scope, cmd.reason, cmd.options) == (None, None, {})


@pytest.mark.parametrize("op", sorted(CONNECTION_OPTIONAL_OPS))
def test_connection_optional_for_configure_and_snapshot(op: str) -> None:
    """configure (defaults) and snapshot (all) may omit the connection."""
    body = good() | {"op": op}
    del body["connection"]
    assert decode_command(json.dumps(body)).connection is None


@given(
    st.sampled_from(sorted(COMMAND_OPS | QUERY_OPS)),
    names,
    st.one_of(st.none(), names),
    st.one_of(st.none(), st.text(max_size=20)),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    st.integers(0, 2**62),
    extra_fields,
)
def test_command_round_trip(
    op: str,
    connection: str,
    scope: str | None,
    reason: str | None,
    options: dict[str, Any],
    ts: int,
    extra: dict[str, Any],
) -> None:
    """encode/decode round-trips any valid command, unknown extra fields included."""
    body = good() | {
        "op": op,
        "connection": connection,
        "scope": scope,
        "reason": reason,
        "options": options,
        "ts": ts,
    }
    body |= extra
    cmd = decode_command(json.dumps(body))
    again = decode_command(encode_command(cmd))
    assert again == cmd
    assert again.model_dump() == body


def _bad(**changes: Any) -> bytes:
    body = good()
    for key, value in changes.items():
        if value is _MISSING:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


_MISSING = object()


def _nested(levels: int) -> list[Any]:
    """``levels`` lists, each inside the next."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "content_type", "field", "value", "fragment"),
    [
        (_bad(op=_MISSING), "application/json", "op", None, "missing"),
        (_bad(op="explode"), "application/json", "op", "explode", "register"),
        (_bad(v=2), "application/json", "v", 2, "unsupported version"),
        (_bad(v=_MISSING), "application/json", "v", None, "missing"),
        (_bad(v="1"), "application/json", "v", "1", "unsupported version"),
        (_bad(connection=""), "application/json", "connection", "", "empty"),
        (_bad(connection="a\x07b"), "application/json", "connection", "a\x07b", "U+0007"),
        (_bad(connection=_MISSING), "application/json", "connection", None, "required"),
        (_bad(connection="x" * 300), "application/json", "connection", "x" * 300, "over"),
        (_bad(scope="\n"), "application/json", "scope", "\n", "U+000A"),
        (_bad(scope=5), "application/json", "scope", 5, "string"),
        (_bad(ts="x"), "application/json", "ts", "x", "integer"),
        (_bad(ts="5"), "application/json", "ts", "5", "integer"),
        (_bad(ts=-1), "application/json", "ts", -1, "greater than or equal"),
        (_bad(ts=1.5), "application/json", "ts", 1.5, "integer"),
        (_bad(ts=True), "application/json", "ts", True, "integer"),
        (_bad(id=""), "application/json", "id", "", "at least 1"),
        (_bad(id=_MISSING), "application/json", "id", None, "missing"),
        (_bad(options=[]), "application/json", "options", [], "dictionary"),
        (_bad(reason=1), "application/json", "reason", 1, "string"),
        (b'{"v": 1, "op":', "application/json", "body", None, "not valid JSON"),
        (b'{"v": NaN}', "application/json", "body", None, "NaN"),
        (b"[1, 2]", "application/json", "body", None, "JSON object"),
        (b'"text"', "application/json", "body", "text", "JSON object"),
        (b'{"v": 1, "op": "\xff"}', "application/json", "body", b"\xff", "not UTF-8"),
        (b" " * 65537, "application/json", "body", 65537, "over the limit"),
        (_bad(options={"a": _nested(33)}), "application/json", "body", 33, "nested deeper"),
        (b"[" * 60000, "application/json", "body", None, None),
        (_bad(), "text/plain", "content_type", "text/plain", "content type"),
        (_bad(), "application/json; charset=latin-1", "content_type", None, "content type"),
    ],
)
def test_bad_input_names_the_field(
    body: bytes, content_type: str, field: str, value: Any, fragment: str | None
) -> None:
    """Each kind of bad input is one ProtocolError naming the field (and the bad value)."""
    with pytest.raises(ProtocolError) as info:
        decode_command(body, content_type)
    assert info.value.field == field
    if value is not None:
        assert info.value.value == value
    if fragment is not None:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "Application/JSON", "application/json; charset=utf-8"],
)
def test_accepted_content_types(content_type: str | None) -> None:
    """None (kombu's default for raw bodies) and application/json are accepted."""
    assert decode_command(_bad(), content_type).op == "failure"


def test_max_bytes_is_configurable() -> None:
    """The size limit is an argument; the body is refused before it is parsed."""
    with pytest.raises(ProtocolError, match="over the limit of 10"):
        decode_command(_bad(), max_bytes=10)


def test_make_command_fills_version_id_and_time() -> None:
    """make_command sets v, a fresh uuid4 hex id, and ts from now_ms."""
    a = make_command("register", "api", "payments", options={"max_attempts": 3}, now_ms=42)
    b = make_command("register", "api", now_ms=42)
    assert a.v == PROTOCOL_VERSION and a.ts == 42 and a.options == {"max_attempts": 3}
    assert len(a.id) == 32 and int(a.id, 16) >= 0 and a.id != b.id
    assert make_command("reset", "api", now_ms=1, id="fixed").id == "fixed"


def test_make_command_refuses_bad_names() -> None:
    """make_command validates like decode_command does."""
    with pytest.raises(ProtocolError) as info:
        make_command("failure", "a.b\n", now_ms=0)
    assert info.value.field == "connection"


def test_encoded_command_is_compact_utf8() -> None:
    """Commands travel as compact JSON with non-ASCII left as UTF-8."""
    body = encode_command(make_command("failure", "zahlungs-API-ü", now_ms=1, id="x"))
    assert b" " not in body
    assert "ü".encode() in body


def _core_event(**changes: Any) -> CoreEvent:
    fields: dict[str, Any] = {
        "event": "state_change",
        "timestamp": 1630000000000,
        "connection": "payment_api",
        "scope": "payments",
        "id": "2f9a",
        "seq": 17,
        "data": {
            "previous_state": "closed",
            "new_state": "open",
            "reason": "Threshold exceeded",
            "failure_count": 10,
            "state": "open",
        },
    }
    fields.update(changes)
    return CoreEvent(**fields)


def test_encode_event_is_the_contract_shape() -> None:
    """encode_event writes compact JSON with exactly the section 5 fields."""
    body = encode_event(_core_event())
    assert json.loads(body) == _core_event().to_dict()
    assert body.startswith(b'{"event":"state_change","timestamp":1630000000000,')


@given(
    st.sampled_from(EVENT_TYPES),
    st.integers(0, 2**62),
    names,
    st.one_of(st.none(), names),
    st.integers(1, 2**40 - 1),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    st.integers(0, 2**62),
)
def test_encode_event_decodes_to_the_same_fields(
    event: str, ts: int, connection: str, scope: str | None, seq: int, data: dict[str, Any],
    epoch: int,
) -> None:
    """An encoded core event (its epoch too) decodes to the same fields, and back to an
    equal core event."""
    core = CoreEvent(event, ts, connection, scope, "id1", seq, data, epoch)
    decoded = decode_event(encode_event(core))
    assert decoded.model_dump() == core.to_dict()
    assert decoded.to_core() == core
    assert decoded == Event.from_core(core)
    assert json.loads(encode_event(decoded)) == json.loads(encode_event(core))


def test_event_seq_is_bounded_so_epoch_and_seq_pack_into_one_mark() -> None:
    """seq 2**40 (it would bleed into the packed epoch) and a negative epoch are refused
    with the field named; an event without epoch (an older owner) decodes to epoch 0."""
    body = _core_event().to_dict()
    for field, value in (("seq", 2**40), ("epoch", -1)):
        with pytest.raises(ProtocolError, match=field):
            decode_event(json.dumps(body | {field: value}))
    del body["epoch"]
    assert decode_event(json.dumps(body)).epoch == 0


def test_event_convenience_properties() -> None:
    """state, new_state, previous_state, reason and failure_count read from data."""
    ev = Event.from_core(_core_event())
    assert (ev.state, ev.new_state, ev.previous_state) == ("open", "open", "closed")
    assert (ev.reason, ev.failure_count, ev.critical) == ("Threshold exceeded", 10, True)
    bare = Event.from_core(_core_event(event="success", data={}))
    assert (bare.state, bare.new_state, bare.reason, bare.failure_count) == (None,) * 4


def test_event_properties_of_issue_15() -> None:
    """mode (normal when absent), detail, slow, reporters and the rates read from data,
    and ignore values of the wrong type."""
    ev = Event.from_core(_core_event(data={
        "state": "open", "failure_count": 0, "reason": "slow_call_rate", "mode": "forced_open",
        "detail": "Slow-call rate 100.0% >= 100%", "reporters": ["a", 3, "b"],
        "failure_rate": 12.5, "slow_call_rate": 100,
    }))
    assert (ev.reason, ev.mode, ev.detail) == (
        "slow_call_rate", "forced_open", "Slow-call rate 100.0% >= 100%")
    assert ev.reporters == ["a", "b"] and not ev.slow
    assert (ev.failure_rate, ev.slow_call_rate) == (12.5, 100.0)
    bare = Event.from_core(_core_event(event="success", data={
        "slow": True, "failure_rate": None, "slow_call_rate": True, "reporters": "a"}))
    assert (bare.mode, bare.detail, bare.slow, bare.reporters) == ("normal", None, True, [])
    assert (bare.failure_rate, bare.slow_call_rate) == (None, None)


def test_outcome_options_travel_as_options() -> None:
    """duration_ms and reporter are plain options of success/failure: they decode
    as sent (the owner's engine checks them and names a bad one)."""
    body = good() | {"options": {"duration_ms": 12.5, "reporter": "web-1:42", "lease": "l"}}
    cmd = decode_command(json.dumps(body).encode())
    assert cmd.options == {"duration_ms": 12.5, "reporter": "web-1:42", "lease": "l"}
    assert decode_command(encode_command(cmd)) == cmd
    configure = good() | {"op": "configure", "options": {"mode": "forced_open"}}
    assert decode_command(json.dumps(configure).encode()).options == {"mode": "forced_open"}


def test_event_keeps_extra_fields() -> None:
    """A newer owner's optional event fields survive decoding and re-encoding."""
    body = _core_event().to_dict() | {"node": "owner-2"}
    ev = decode_event(json.dumps(body))
    assert ev.model_extra == {"node": "owner-2"}
    assert json.loads(encode_event(ev))["node"] == "owner-2"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event": "stat_change"}, "event"),
        ({"seq": 0}, "seq"),
        ({"timestamp": "now"}, "timestamp"),
        ({"connection": ""}, "connection"),
        ({"data": []}, "data"),
    ],
)
def test_decode_event_refuses(changes: dict[str, Any], field: str) -> None:
    """Subscribers get a ProtocolError naming the bad event field."""
    body = _core_event().to_dict() | changes
    with pytest.raises(ProtocolError) as info:
        decode_event(json.dumps(body))
    assert info.value.field == field


def test_encode_event_refuses_non_json_data() -> None:
    """Data that JSON cannot carry (NaN, sets) is a ProtocolError, not bad output."""
    with pytest.raises(ProtocolError):
        encode_event(_core_event(data={"x": float("nan")}))
    with pytest.raises(ProtocolError):
        encode_event(_core_event(data={"x": {1, 2}}))


def test_reply_round_trip() -> None:
    """Replies round-trip, including their events and extra fields."""
    reply = Reply.model_validate(
        {"ok": True, "result": {"state": "open"}, "events": [_core_event().to_dict()], "x": 1}
    )
    again = decode_reply(encode_reply(reply))
    assert again == reply
    assert again.model_dump()["x"] == 1
    assert decode_reply(encode_reply(Reply(ok=False, error="nope"))).error == "nope"


def test_reply_version_checked() -> None:
    """A reply from an unknown protocol version is refused."""
    with pytest.raises(ProtocolError, match="unsupported version") as info:
        decode_reply(b'{"v": 2, "ok": true}')
    assert info.value.field == "v"


# -- the client's encode path: command_body == encode_command(make_command(...)) ---------
_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
)


@given(
    op=st.sampled_from(sorted(protocol.COMMAND_OPS | protocol.QUERY_OPS)),
    connection=st.text(min_size=1, max_size=12),
    scope=st.none() | st.text(min_size=1, max_size=12),
    reason=st.none() | st.text(max_size=20) | st.integers(),
    options=st.none() | st.dictionaries(st.text(max_size=6) | st.integers(), _json, max_size=3),
    now_ms=st.integers(min_value=-1, max_value=2**53),
)
def test_command_body_encodes_what_make_command_encodes(
    op: str, connection: str, scope: str | None, reason: Any, options: Any, now_ms: int
) -> None:
    """command_body gives the bytes of encode_command(make_command(...)) with the same id,
    or raises the error make_command/check_names raises for the same arguments."""
    from brama_mq.core.routing import check_names
    from brama_mq.errors import InvalidNameError

    try:
        check_names(scope, connection)
        expected: Any = protocol.encode_command(
            protocol.make_command(op, connection, scope, reason, options, now_ms=now_ms,
                                  id="the-id")
        )
    except (InvalidNameError, ProtocolError) as exc:
        expected = type(exc)
    try:
        got: Any = protocol.command_body(
            op, connection, scope, reason, options, now_ms=now_ms, id="the-id"
        )[0]
    except (InvalidNameError, ProtocolError) as exc:
        got = type(exc)
    assert got == expected


@given(
    op=st.sampled_from(["success", "failure", "release_probe"]) | st.text(max_size=8),
    connection=st.text(min_size=1, max_size=12),
    scope=st.none() | st.text(min_size=1, max_size=12),
    reason=st.none() | st.text(max_size=20),
    lease=st.none() | st.text(max_size=8),
    count=st.integers(min_value=-2, max_value=2**40),
    now_ms=st.integers(min_value=-1, max_value=2**53),
    duration_ms=st.none() | st.integers(-1, 10**6) | st.floats(allow_nan=False),
    reporter=st.none() | st.text(max_size=12),
)
def test_report_body_is_command_body_of_the_report(
    op: str, connection: str, scope: str | None, reason: str | None, lease: str | None,
    count: int, now_ms: int, duration_ms: float | None, reporter: str | None,
) -> None:
    """The outbox's entry point writes command_body's bytes (with ``lease`` or ``count``,
    then ``duration_ms`` and ``reporter`` as the options), or raises what command_body
    raises."""
    from brama_mq.errors import InvalidNameError

    options: dict[str, Any] | None = (
        {"lease": lease} if lease else {"count": count} if count != 1 else None
    )
    if duration_ms is not None or reporter is not None:
        options = dict(options or {})
        if duration_ms is not None:
            options["duration_ms"] = duration_ms
        if reporter is not None:
            options["reporter"] = reporter
    try:
        got: Any = codec.report_body(op, connection, scope, reason, now_ms=now_ms,
                                        lease=lease, count=count, duration_ms=duration_ms,
                                        reporter=reporter)
        ident = json.loads(got)["id"]
    except (InvalidNameError, ProtocolError) as exc:
        got, ident = type(exc), None
    try:
        expected: Any = protocol.command_body(op, connection, scope, reason, options,
                                              now_ms=now_ms, id=ident)[0]
    except (InvalidNameError, ProtocolError) as exc:
        expected = type(exc)
    assert got == expected


def test_command_body_ids_are_unique_and_drawn_per_process() -> None:
    """Without an id, each command gets a new one: a per-process prefix plus a counter."""
    ids = {protocol.command_body("failure", "api", now_ms=1)[1] for _ in range(1000)}
    assert len(ids) == 1000
    body, ident = protocol.command_body("success", "api", "s", now_ms=7)
    assert json.loads(body)["id"] == ident
    prefix = ident.rsplit("-", 1)[0]
    assert len(prefix) == 20 and all(c in "0123456789abcdef" for c in prefix)
