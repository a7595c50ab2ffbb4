"""Hostile input on ``brama.commands``: the worker never stops, and every message is
either applied or dead-lettered with its reason (in = applied + queries + dead-lettered).

Hypothesis draws batches of hostile messages (arbitrary bytes, wrong content types,
deep and huge JSON, a wrong type in every field, unknown versions and ops, names at and
over every limit) mixed with good commands; a real ``brama-mq worker`` process consumes
them from the shared broker. Every message carries a test id in a header, which the
owner copies to the dead-letter queue, so the test checks per message: what must be
refused is in ``brama.dead`` with a reason, what must apply is not, and the worker's own
account at exit (``worker stopped: commands=... applied=... dead_lettered=...``) adds up
to what was published.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brama_mq.client import Brama
from brama_mq.core.routing import _LONGEST_EVENT_BYTES, MAX_KEY_BYTES
from brama_mq.protocol import MAX_BYTES, MAX_DEPTH
from brama_mq.transport import Topology
from tests.brokers import WireProbe
from tests.worker_proc import WorkerProcess

pytestmark = pytest.mark.broker

DEAD = "dead"  # must be dead-lettered
APPLIED = "applied"  # must be applied (never dead-lettered)
ANY = "any"  # either, but accounted for

# The longest connection name (ASCII, no scope) whose every routing key fits 255 bytes.
LONGEST_NAME = MAX_KEY_BYTES - len("_..") - _LONGEST_EVENT_BYTES


@dataclass
class Hostile:
    """One message to publish and what the owner must do with it."""

    body: bytes
    expect: str
    kind: str
    content_type: str | None = "application/json"
    reason_word: str | None = None  # a word the dead-letter reason must contain
    headers: dict[str, Any] = field(default_factory=dict)


_counter = iter(range(10**9))


def _name() -> str:
    return f"h{next(_counter)}"


def _good(op: str = "register", **extra: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {"v": 1, "op": op, "connection": _name(), "id": f"t{next(_counter)}",
                           "ts": 1_700_000_000_000}
    cmd.update(extra)
    return cmd


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def good_commands(draw: st.DrawFn) -> Hostile:
    """A register of a fresh name, optionally with a charset or no content type at all."""
    ctype = draw(st.sampled_from(["application/json", None, "application/json; charset=utf-8"]))
    return Hostile(_dumps(_good()), APPLIED, "good", content_type=ctype)


@st.composite
def arbitrary_bytes(draw: st.DrawFn) -> Hostile:
    body = draw(st.binary(max_size=600))
    return Hostile(body, ANY, "bytes")


@st.composite
def non_utf8(draw: st.DrawFn) -> Hostile:
    prefix = draw(st.binary(max_size=40))
    return Hostile(prefix + b"\xff\xfe" + prefix, DEAD, "non-utf8", reason_word="UTF-8")


@st.composite
def wrong_content_type(draw: st.DrawFn) -> Hostile:
    ctype = draw(
        st.one_of(
            st.sampled_from(
                ["text/plain", "application/xml", "application/x-msgpack", "image/png",
                 "application/json; charset=latin-1", "application/octet-stream"]
            ),
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                    max_size=30).filter(lambda t: t.split(";")[0].strip().lower()
                                        != "application/json"),
        )
    )
    return Hostile(_dumps(_good()), DEAD, "content-type", content_type=ctype,
                   reason_word="content type")


@st.composite
def deep_json(draw: st.DrawFn) -> Hostile:
    depth = draw(st.integers(min_value=MAX_DEPTH + 2, max_value=20_000))
    inner = draw(st.sampled_from(["[", '{"a":']))
    closing = "]" if inner == "[" else "}"
    payload = inner * depth + "1" + closing * depth
    body = ('{"v":1,"op":"register","connection":"deep","options":{"metadata":'
            + payload + "}}").encode()
    return Hostile(body, DEAD, "deep")


@st.composite
def huge_json(draw: st.DrawFn) -> Hostile:
    """Bodies around the size limit: over it refused, at it judged on content."""
    delta = draw(st.integers(min_value=-3, max_value=200_000))
    cmd = _good(op="failure", reason="")
    base = len(_dumps(cmd))
    cmd["reason"] = "x" * max(0, MAX_BYTES + delta - base)
    body = _dumps(cmd)
    if len(body) > MAX_BYTES:
        return Hostile(body, DEAD, "huge", reason_word="over the limit")
    return Hostile(body, ANY, "at-size-limit")


WRONG_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "v": st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.floats(1.5, 9)),
    "op": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "connection": st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2),
                            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                            st.just(""), st.none()),
    "scope": st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.just(""),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "id": st.one_of(st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "ts": st.one_of(st.text(min_size=1, max_size=5).filter(lambda t: not t.strip().isdigit()),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                         st.integers())),
    "reason": st.one_of(st.lists(st.integers(), min_size=1, max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), min_size=1,
                                        max_size=2)),
    "options": st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)),
}


@st.composite
def wrong_field_type(draw: st.DrawFn) -> Hostile:
    """One field of an otherwise good command gets a value of the wrong type."""
    name = draw(st.sampled_from(sorted(WRONG_TYPES)))
    value = draw(WRONG_TYPES[name])
    cmd = _good()  # a register: refused only for the bad field, never as not registered
    cmd["reason"] = "r"
    cmd[name] = value
    word = name if len(name) > 2 else None
    return Hostile(_dumps(cmd), DEAD, f"type:{name}", reason_word=word)


@st.composite
def wrong_option(draw: st.DrawFn) -> Hostile:
    """A register whose policy options are of the wrong type or out of range."""
    option = draw(st.sampled_from(
        ["max_attempts", "expiry_ms", "half_open_permits", "success_threshold", "backoff",
         "slow_call_ms", "slow_call_rate_threshold", "window_seconds", "min_reporters",
         "window_type", "mode"]))
    value = draw(st.one_of(st.text(min_size=1, max_size=4), st.integers(max_value=-1),
                           st.lists(st.integers(), max_size=2)))
    if option in ("window_type", "mode") and isinstance(value, str):
        value = "x" + value  # no valid word starts with "x"
    return Hostile(_dumps(_good(options={option: value})), DEAD, f"option:{option}",
                   reason_word=option)


@st.composite
def wrong_outcome_option(draw: st.DrawFn) -> Hostile:
    """A success or failure with a bad duration_ms or reporter: refused naming the option
    (before the connection is looked up, so an unregistered name makes no difference)."""
    option = draw(st.sampled_from(["duration_ms", "reporter"]))
    if option == "duration_ms":
        value: Any = draw(st.one_of(st.integers(max_value=-1),
                                    st.floats(max_value=-0.001, allow_nan=False,
                                              allow_infinity=False),
                                    st.text(max_size=3), st.lists(st.integers(), max_size=2)))
    else:
        value = draw(st.one_of(st.just(""), st.text(min_size=201, max_size=210),
                               st.integers(), st.lists(st.text(), max_size=2)))
    op = draw(st.sampled_from(["success", "failure"]))
    return Hostile(_dumps(_good(op, options={option: value})), DEAD, f"outcome:{option}",
                   reason_word=option)


@st.composite
def unknown_version_or_op(draw: st.DrawFn) -> Hostile:
    if draw(st.booleans()):
        version = draw(st.integers().filter(lambda v: v != 1))
        return Hostile(_dumps({**_good(), "v": version}), DEAD, "version", reason_word="version")
    op = draw(st.text(max_size=12).filter(
        lambda o: o not in {"register", "unregister", "success", "failure", "open", "close",
                            "reset", "configure", "status", "snapshot", "acquire_probe",
                            "release_probe"}))
    return Hostile(_dumps({**_good(), "op": op}), DEAD, "op", reason_word="op")


@st.composite
def names_at_limits(draw: st.DrawFn) -> Hostile:
    """Connection and scope names at, just over and far over the routing-key limit."""
    over = draw(st.one_of(st.just(0), st.just(1), st.integers(min_value=2, max_value=300)))
    tag = _name()
    if over == 0:
        # exactly the longest name that fits: must be accepted
        name = (tag + "a" * LONGEST_NAME)[:LONGEST_NAME]
        return Hostile(_dumps({**_good(), "connection": name}), APPLIED, "name-at-limit")
    name = (tag + "a" * (LONGEST_NAME + over))[: LONGEST_NAME + over]
    if draw(st.booleans()):  # an encoded character costs three bytes, not one
        name = name[: max(1, LONGEST_NAME - 2)] + "." + "b" * (over // 3)
        return Hostile(_dumps({**_good(), "connection": name}), DEAD, "name-encoded-over",
                       reason_word="255")
    return Hostile(_dumps({**_good(), "connection": name}), DEAD, "name-over",
                   reason_word="255")


@st.composite
def bad_names(draw: st.DrawFn) -> Hostile:
    """Names with control characters or lone surrogates are refused."""
    ctrl = draw(st.sampled_from(["\x00", "\n", "\x1f", "\x7f", "\u0085"]))
    where = draw(st.sampled_from(["connection", "scope"]))
    cmd = _good()
    cmd[where] = f"a{ctrl}b"
    return Hostile(_dumps(cmd), DEAD, f"control:{where}")


@st.composite
def odd_properties(draw: st.DrawFn) -> Hostile:
    """A good command with unusual AMQP properties (headers of every type) still applies."""
    headers = draw(st.dictionaries(
        st.text(alphabet="abcdefgh-", min_size=1, max_size=8).filter(lambda k: k != "x-test-id"),
        st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=10), st.booleans()),
        max_size=4))
    return Hostile(_dumps(_good()), APPLIED, "odd-headers", headers=headers)


def _padded_register(size: int) -> bytes:
    """A good register whose body is exactly ``size`` bytes (padding in its metadata)."""
    cmd = _good(options={"metadata": {"pad": ""}})
    base = len(_dumps(cmd))
    cmd["options"]["metadata"]["pad"] = "p" * (size - base)
    body = _dumps(cmd)
    assert len(body) == size
    return body


def seed_batch() -> list[Hostile]:
    """One of each limit, exactly at and just over it, whatever hypothesis draws."""
    at_name = (_name() + "a" * LONGEST_NAME)[:LONGEST_NAME]
    over_name = (_name() + "a" * LONGEST_NAME)[: LONGEST_NAME + 1]
    return [
        Hostile(_padded_register(MAX_BYTES), APPLIED, "size-at-limit"),
        Hostile(_padded_register(MAX_BYTES + 1), DEAD, "size-over-by-one",
                reason_word="over the limit"),
        Hostile(_dumps({**_good(), "connection": at_name}), APPLIED, "name-at-limit"),
        Hostile(_dumps({**_good(), "connection": over_name}), DEAD, "name-over-by-one",
                reason_word="255"),
        Hostile(_dumps({**_good(), "scope": at_name}), DEAD, "scope-and-name-over",
                reason_word="255"),
        Hostile(b"", DEAD, "empty-body"),
        Hostile(b"\xef\xbb\xbf" + _dumps(_good()), DEAD, "utf8-bom"),
        Hostile(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), DEAD, "depth-over-by-one"),
        Hostile(b'{"v":1,"op":"register","connection":"nan","id":"n","ts":1,'
                b'"options":{"metadata":{"x":NaN}}}', DEAD, "nan"),
    ]


hostile = st.one_of(
    good_commands(), arbitrary_bytes(), non_utf8(), wrong_content_type(), deep_json(),
    huge_json(), wrong_field_type(), wrong_option(), wrong_outcome_option(),
    unknown_version_or_op(),
    names_at_limits(), bad_names(), odd_properties(), st.builds(
        lambda v: Hostile(_dumps(v), DEAD, "not-an-object"),
        st.one_of(json_leaf, st.lists(json_value, max_size=3))),
)


class Publisher:
    """Raw py-amqp publisher with confirms: the test owns every byte and property."""

    def __init__(self, url: str, exchange: str) -> None:
        from urllib.parse import urlparse

        u = urlparse(url)
        vhost = u.path[1:] or "/"
        self.conn = amqp.Connection(f"{u.hostname}:{u.port or 5672}", userid=u.username,
                                    password=u.password, virtual_host=vhost)
        self.conn.connect()
        self.ch = self.conn.channel()
        self.ch.confirm_select()
        self.exchange = exchange

    def publish(self, test_id: int, h: Hostile) -> None:
        props: dict[str, Any] = {"delivery_mode": 2,
                                 "application_headers": {**h.headers, "x-test-id": test_id}}
        if h.content_type is not None:
            props["content_type"] = h.content_type
        self.ch.basic_publish(amqp.Message(h.body, **props), exchange=self.exchange,
                              routing_key="owner", mandatory=True)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def worker(prefix: str, broker_url: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(tmp_path / "worker.log",
                      {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix})
    try:
        w.wait_ready()
        yield w
    finally:
        w.close()


def test_hostile_input_is_applied_or_dead_lettered(
    worker: WorkerProcess, prefix: str, broker_url: str
) -> None:
    """Whatever arrives, the worker keeps running and accounts for every message:
    must-refuse ones are dead-lettered with a reason naming the problem, good ones
    apply, and commands = applied + queries + dead-lettered at exit."""
    topo = Topology(prefix)
    publisher = Publisher(broker_url, topo.commands_exchange)
    client = Brama(broker_url, prefix=prefix, request_timeout=30)
    sent: dict[int, Hostile] = {}
    barriers = 0

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile, min_size=1, max_size=40))
    def feed(batch: list[Hostile]) -> None:
        nonlocal barriers
        for h in batch:  # confirm mode: each publish returns once the broker has it
            test_id = len(sent)
            sent[test_id] = h
            publisher.publish(test_id, h)
        # a snapshot query answers only after everything before it was applied and acked
        client.snapshot()
        barriers += 1
        assert worker.alive(), worker.output()

    try:
        for test_id, h in enumerate(seed_batch()):
            sent[test_id] = h
            publisher.publish(test_id, h)
        feed()
        worker.terminate()
        assert worker.wait(30) == 0, worker.output()
    finally:
        client.disconnect()
        publisher.close()
    out = worker.output()
    m = re.search(r"worker stopped: commands=(\d+) applied=(\d+) queries=(\d+) "
                  r"dead_lettered=(\d+)", out)
    assert m, out[-3000:]
    commands, applied, queries, dead_count = (int(g) for g in m.groups())

    probe = WireProbe(broker_url, topo.dead_queue, declare=False)
    try:
        dead = probe.take()
        left = WireProbe(broker_url, topo.owner_queue(), declare=False)
        try:
            assert left.depth() == 0, "commands were left in the owner queue"
        finally:
            left.close()
    finally:
        probe.close()

    by_id: dict[int, str] = {}
    for msg in dead:
        headers = msg.properties.get("application_headers") or {}
        reason = headers.get("x-brama-error")
        assert isinstance(reason, str) and reason, f"dead letter without a reason: {headers}"
        test_id = headers.get("x-test-id")
        assert isinstance(test_id, int), f"dead letter lost its headers: {headers}"
        assert test_id not in by_id, f"message {test_id} dead-lettered twice"
        by_id[test_id] = reason

    # the accounting: nothing vanished, nothing was counted twice
    assert commands == len(sent) + barriers, (commands, len(sent), barriers)
    assert queries == barriers
    assert commands == applied + queries + dead_count
    assert dead_count == len(dead) == len(by_id)

    wrong: list[str] = []
    kinds: dict[str, int] = {}
    for test_id, h in sent.items():
        kinds[h.kind] = kinds.get(h.kind, 0) + 1
        if h.expect == DEAD and test_id not in by_id:
            wrong.append(f"{test_id} ({h.kind}) was applied: {h.body[:120]!r}")
        elif h.expect == APPLIED and test_id in by_id:
            wrong.append(f"{test_id} ({h.kind}) was refused: {by_id[test_id]}")
        elif (h.expect == DEAD and h.reason_word
              and h.reason_word.lower() not in by_id[test_id].lower()):
            wrong.append(f"{test_id} ({h.kind}) reason lacks {h.reason_word!r}: "
                         f"{by_id[test_id]}")
    assert not wrong, "\n".join(wrong[:20])
    print(f"hostile input: in={commands} applied={applied} queries={queries} "
          f"dead_lettered={dead_count} kinds={kinds}")
