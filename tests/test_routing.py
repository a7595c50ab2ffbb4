"""The routing-key codec and filter bindings (section 4 of the wire contract)."""

from __future__ import annotations

import unicodedata
import zlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from brama_mq.core.events import EVENT_TYPES
from brama_mq.core.routing import (
    MAX_KEY_BYTES,
    binding_keys,
    check_names,
    decode_scope,
    decode_word,
    encode_name,
    encode_scope,
    parse_routing_key,
    routing_key,
    stable_shard,
)
from brama_mq.errors import FilterError, InvalidNameError

LONGEST_EVENT = max(EVENT_TYPES, key=len)


def is_valid_name(value: str) -> bool:
    """The documented rule, written independently of the implementation."""
    if not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") for c in value)


names = st.text(min_size=1, max_size=40).filter(is_valid_name)
# Text biased towards the characters the codec treats specially.
tricky = st.text(alphabet=st.sampled_from("%.*#_25EFAa3é🙂"), min_size=1, max_size=12)
any_name = st.one_of(names, tricky)


@pytest.mark.parametrize(
    ("name", "word"),
    [
        ("payment_api", "payment_api"),
        ("a.b", "a%2Eb"),
        ("a*", "a%2A"),
        ("#", "%23"),
        ("100%", "100%25"),
        ("%2E", "%252E"),
        ("_", "%5F"),
        ("__", "__"),
        ("_x", "_x"),
        ("%5F", "%255F"),
        ("*.#%", "%2A%2E%23%25"),
        ("zahlungs-API ü", "zahlungs-API ü"),
        ("платежи", "платежи"),
        ("🙂.🚀", "🙂%2E🚀"),
        ("👨\u200d👩\u200d👧", "👨\u200d👩\u200d👧"),
        (" ", " "),
    ],
)
def test_encode_name_table(name: str, word: str) -> None:
    """Each name encodes to the documented word and decodes back."""
    assert encode_name(name) == word
    assert decode_word(word) == name


def test_scope_none_and_literal_underscore() -> None:
    """None is the word ``_``; a scope literally ``_`` is ``%5F``; both decode back."""
    assert encode_scope(None) == "_"
    assert encode_scope("_") == "%5F"
    assert decode_scope("_") is None
    assert decode_scope("%5F") == "_"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("a\nb", "U+000A"),
        ("\x00", "U+0000"),
        ("tab\there", "U+0009"),
        ("del\x7f", "U+007F"),
        ("c1\x85", "U+0085"),
        ("ls\u2028", "U+2028"),
        ("ps\u2029", "U+2029"),
        ("lone\ud800", "surrogate"),
        (b"bytes", "must be a str"),
        (5, "must be a str"),
        (None, "must be a str"),
    ],
)
def test_invalid_names_raise(value: object, fragment: str) -> None:
    """Empty, control characters, lone surrogates and non-str values are refused with why."""
    with pytest.raises(InvalidNameError) as info:
        encode_name(value, "scope")  # type: ignore[arg-type]
    assert info.value.field == "scope"
    assert fragment in info.value.problem


@pytest.mark.parametrize("word", ["_", "a.b", "a*", "#", "%", "%2", "%2e", "%41", "%5Fx", "", "\n"])
def test_decode_refuses_non_canonical_words(word: str) -> None:
    """Only the encoder's own spelling decodes, since bindings compare words byte for byte."""
    with pytest.raises(InvalidNameError):
        decode_word(word)


@given(any_name)
def test_round_trip(name: str) -> None:
    """Every valid name survives encode then decode, as scope and as connection."""
    assert decode_word(encode_name(name)) == name
    assert decode_scope(encode_scope(name)) == name


@given(st.text(max_size=20))
def test_validity_rule(value: str) -> None:
    """A name is accepted exactly when the documented rule says it is valid."""
    if is_valid_name(value):
        encode_name(value)
    else:
        with pytest.raises(InvalidNameError):
            encode_name(value)


@given(any_name)
def test_encoded_word_is_one_topic_word(name: str) -> None:
    """An encoded word never contains ``.``, ``*`` or ``#``, and is never the bare ``_``."""
    word = encode_name(name)
    assert not set(word) & set(".*#")
    assert word != "_"


@given(any_name, any_name)
def test_injective(a: str, b: str) -> None:
    """Two distinct names never share an encoded word (and None's word is nobody's)."""
    assume(a != b)
    assert encode_name(a) != encode_name(b)
    assert encode_scope(a) != encode_scope(None)


@given(st.one_of(st.none(), any_name), any_name, st.sampled_from(EVENT_TYPES))
def test_routing_key_round_trip(scope: str | None, connection: str, event: str) -> None:
    """A key has exactly three words and parses back to what built it."""
    key = routing_key(scope, connection, event)
    assert len(key.split(".")) == 3
    assert parse_routing_key(key) == (scope, connection, event)


def test_routing_key_examples() -> None:
    """Keys read as ``<scope>.<connection>.<event>`` with the documented encodings."""
    assert routing_key("payments", "payment_api", "state_change") == (
        "payments.payment_api.state_change"
    )
    assert routing_key(None, "api.v2", "failure") == "_.api%2Ev2.failure"
    assert routing_key("_", "_", "success") == "%5F.%5F.success"


def test_routing_key_unknown_event() -> None:
    """An event type the contract does not define gets no key."""
    with pytest.raises(InvalidNameError, match="state_change"):
        routing_key("s", "c", "stat_change")


def test_routing_key_over_255_bytes() -> None:
    """A key over 255 UTF-8 bytes is refused, naming the long name and the excess."""
    connection = "é" * 120  # 240 bytes
    ok_len = MAX_KEY_BYTES - len("_..failure") - 240
    routing_key(None, connection + "x" * ok_len, "failure")  # exactly 255 bytes
    with pytest.raises(InvalidNameError) as info:
        routing_key(None, connection + "x" * (ok_len + 1), "failure")
    assert info.value.field == "connection"
    assert "256 UTF-8 bytes, 1 over" in str(info.value)
    with pytest.raises(InvalidNameError) as info:
        routing_key("s" * 300, "c", "failure")
    assert info.value.field == "scope"


def test_escapes_count_towards_the_limit() -> None:
    """The limit applies to the encoded key: each ``.`` costs three bytes."""
    with pytest.raises(InvalidNameError):
        routing_key(None, "." * 82, "failure")  # 246 encoded bytes + 10


def test_check_names_uses_longest_event() -> None:
    """check_names refuses names whose longest possible key would not fit."""
    fits = MAX_KEY_BYTES - len("_..") - len(LONGEST_EVENT)
    check_names(None, "c" * fits)
    routing_key(None, "c" * fits, LONGEST_EVENT)
    with pytest.raises(InvalidNameError, match="1 over"):
        check_names(None, "c" * (fits + 1))
    # The short event alone would still fit; check_names is stricter on purpose.
    routing_key(None, "c" * (fits + 1), "failure")


def test_check_names_validates_both() -> None:
    """check_names refuses a bad scope as well as a bad connection."""
    with pytest.raises(InvalidNameError) as info:
        check_names("", "c")
    assert info.value.field == "scope"
    with pytest.raises(InvalidNameError) as info:
        check_names("s", "\t")
    assert info.value.field == "connection"


@pytest.mark.parametrize(
    "key",
    ["a.b", "a.b.c.d", "", "_.c.", "_._.failure", "s.%2e.failure", "s.c%XY.failure", ".c.failure"],
)
def test_parse_routing_key_refuses(key: str) -> None:
    """Keys that are not three canonical words are refused."""
    with pytest.raises(InvalidNameError):
        parse_routing_key(key)


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({}, ["#"]),
        ({"scope": "payments"}, ["payments.*.*"]),
        (
            {"connection": "payment_api", "events": ["state_change", "failure"]},
            ["*.payment_api.state_change", "*.payment_api.failure"],
        ),
        ({"events": "circuit_opened"}, ["*.*.circuit_opened"]),
        ({"events": [":state_change"]}, ["*.*.state_change"]),
        ({"scope": "payments", "connection": "payment_api"}, ["payments.payment_api.*"]),
        (
            {"scope": ["a", "b"], "connection": "c", "events": ["success", "failure"]},
            ["a.c.success", "a.c.failure", "b.c.success", "b.c.failure"],
        ),
        ({"events": ["failure", ":failure", "failure"]}, ["*.*.failure"]),
        ({"connection": "a.b*"}, ["*.a%2Eb%2A.*"]),
        ({"scope": "_"}, ["%5F.*.*"]),
        ({"connection": ("x" for x in range(1))}, ["*.x.*"]),
    ],
)
def test_binding_keys(kwargs: dict[str, object], keys: list[str]) -> None:
    """Filters become the documented bindings, deduplicated, in a stable order."""
    assert binding_keys(**kwargs) == keys  # type: ignore[arg-type]


def test_binding_keys_unknown_event_lists_valid_names() -> None:
    """An unknown event name is a FilterError that lists every valid name."""
    with pytest.raises(FilterError) as info:
        binding_keys(events=["state_changed"])
    for name in EVENT_TYPES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"events": []},
        {"connection": []},
        {"scope": ()},
        {"connection": ""},
        {"scope": ["ok", "bad\n"]},
        {"events": [1]},
        {"connection": "x" * 300},
    ],
)
def test_binding_keys_refuses(kwargs: dict[str, object]) -> None:
    """Empty filters (they would match nothing) and invalid names raise FilterError."""
    with pytest.raises(FilterError):
        binding_keys(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scope", "connection", "shards", "expected"),
    [
        (None, "payment_api", 1, 0),
        (None, "payment_api", 16, 7),
        ("payments", "payment_api", 7, 0),
        ("payments", "payment_api", 1000, 266),
        ("_", "a.b", 10, 9),
    ],
)
def test_stable_shard_literal_values(
    scope: str | None, connection: str, shards: int, expected: int
) -> None:
    """Pinned values: other languages implement the same hash, so it must never change."""
    assert stable_shard(scope, connection, shards) == expected


def test_stable_shard_is_crc32_of_the_encoded_words() -> None:
    """The documented formula: CRC-32 of ``<scope word>.<connection word>`` mod shards."""
    assert stable_shard("_", "a.b", 1 << 20) == zlib.crc32(b"%5F.a%2Eb") % (1 << 20)
    assert stable_shard(None, "é", 97) == zlib.crc32("_.é".encode()) % 97


@given(st.one_of(st.none(), any_name), any_name, st.integers(1, 1000))
def test_stable_shard_in_range(scope: str | None, connection: str, shards: int) -> None:
    """The shard is always in ``range(shards)`` and the same on every call."""
    shard = stable_shard(scope, connection, shards)
    assert 0 <= shard < shards
    assert stable_shard(scope, connection, shards) == shard


@pytest.mark.parametrize("shards", [0, -1, True, 1.5])
def test_stable_shard_refuses_bad_counts(shards: object) -> None:
    """A shard count must be a positive int."""
    with pytest.raises(ValueError):
        stable_shard(None, "c", shards)  # type: ignore[arg-type]
