"""``brama_mq.client.link``: the client's one way to the owner (link, routing, posts,
RPCs), shared by ``Brama``, the outbox and the guards, on the in-process transport."""

from __future__ import annotations

import json
from typing import Any

from brama_mq.client import Brama
from brama_mq.client import link as link_module
from brama_mq.client.link import BufferedLink, CommandLink
from brama_mq.client.outbox import MAX_REASON, Outbox, Report
from brama_mq.core.routing import stable_shard
from brama_mq.owner import run_owner
from brama_mq.protocol import command_body, decode_command
from brama_mq.transport import MemoryTransport, Topology
from brama_mq.transport.base import ClientLink


class _PlainLink:
    """A ClientLink with only the protocol's four methods (no buffer of its own)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str]] = []
        self.posted: list[tuple[bytes, str, str | None, bool]] = []
        self.closed = False

    def send(self, body: bytes, routing_key: str = "owner", *,
             message_id: str | None = None) -> None:
        self.sent.append((body, routing_key))

    def post(self, body: bytes, routing_key: str = "owner", *, message_id: str | None = None,
             confirm: bool = False) -> bool:
        self.posted.append((body, routing_key, message_id, confirm))
        return True

    def request(self, body: bytes, timeout: float, routing_key: str = "owner") -> bytes:
        raise AssertionError("not used here")

    def close(self) -> None:
        self.closed = True


class _PlainTransport(MemoryTransport):
    def __init__(self, link: _PlainLink) -> None:
        super().__init__()
        self.plain = link

    def client_link(self) -> Any:
        return self.plain


def test_routing_follows_the_shards() -> None:
    """Unsharded everything goes to ``owner``; sharded, a connection to its shard."""
    one = CommandLink(MemoryTransport())
    assert one.route("s", "api") == "owner" and one.shard_keys() == ["owner"]
    four = CommandLink(MemoryTransport(Topology("t", shards=4)))
    assert four.route("s", "api") == f"owner.{stable_shard('s', 'api', 4)}"
    assert four.route("s", None) == "owner"
    assert four.shard_keys() == ["owner.0", "owner.1", "owner.2", "owner.3"]


def test_shipped_links_buffer_and_take_the_client_buffer_size() -> None:
    """The in-memory link is a BufferedLink; the client's buffer size reaches it."""
    client = Brama(transport=MemoryTransport(), buffer_size=123)
    try:
        assert client.commands.opened is None
        link = client.link
        assert isinstance(link, BufferedLink) and link.max_buffer == 123
        assert client.commands.opened is link and client.pending() == 0 and client.flush(1)
    finally:
        client.disconnect()
    assert client.commands.opened is None


def test_a_link_without_a_buffer_is_posted_to_and_sent_to_one_by_one() -> None:
    """A ClientLink with only send/post/request/close: a command is posted (confirmed),
    an outbox batch is sent command by command; nothing is pending, flush is at once."""
    plain = _PlainLink()
    commands = CommandLink(_PlainTransport(plain))
    assert isinstance(plain, ClientLink) and not isinstance(plain, BufferedLink)
    commands.command("failure", "api", "s", reason="boom")
    ((body, key, ident, confirm),) = plain.posted
    assert key == "owner" and confirm and json.loads(body)["id"] == ident
    commands.post_many([(b"{}", "owner"), (b"[]", "owner.1")])
    assert plain.sent == [(b"{}", "owner"), (b"[]", "owner.1")]
    assert commands.pending() == 0 and commands.flush(0)
    commands.close()
    assert plain.closed and commands.opened is None


def test_request_timeout_set_on_the_client_reaches_its_link() -> None:
    """``client.request_timeout = x`` after construction still bounds every RPC."""
    client = Brama(transport=MemoryTransport(), request_timeout=7.0)
    assert client.commands.request_timeout == 7.0
    client.request_timeout = 0.25
    assert client.commands.request_timeout == 0.25 and client.request_timeout == 0.25


def test_commands_queries_and_snapshot_through_the_link(memory_transport: MemoryTransport) -> None:
    """A posted command, an RPC with ``wait`` and the shard-gathering snapshot."""
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        applied = client.commands.command("register", "api", "s", wait=True)
        assert applied is not None and applied.status == "applied"
        assert client.commands.command("failure", "api", "s", reason="x") is None
        rows = client.commands.snapshot("s")
        assert [(r["connection"], r["failure_count"]) for r in rows] == [("api", 1)]
        assert client.commands.query("status", "api", "s")["failure_count"] == 1
    finally:
        client.disconnect()
        owner.stop(wait=5)


def test_after_fork_the_child_opens_its_own_link() -> None:
    """The fork hook keeps the parent's link referenced, unused, and forgets it."""
    commands = CommandLink(MemoryTransport())
    parent = commands.link
    link_module._after_fork()  # what os.register_at_fork runs in a child
    try:
        assert commands.opened is None and parent in link_module._INHERITED
        assert commands.link is not parent
    finally:
        link_module._INHERITED.remove(parent)
        parent.close()
        commands.close()


def test_outbox_bodies_are_the_protocol_encoders() -> None:
    """The outbox has no encoder of its own: its body is command_body's, with the reason
    cut and a lone surrogate replaced, and ``count``/``lease`` as options."""
    report = Report("failure", "api", "s", "E: " + "x" * 2000 + "\udc80", None, 5_000_000_000)
    body = Outbox.encode(report)
    ident = json.loads(body)["id"]
    reason = ("E: " + "x" * 2000)[: MAX_REASON - 3] + "..."
    assert body == command_body("failure", "api", "s", reason, now_ms=5000, id=ident)[0]
    counted = Outbox.encode(Report("success", "api", None, None, None, 1_000_000, 3))
    assert decode_command(counted).options == {"count": 3}
    leased = decode_command(Outbox.encode(Report("success", "api", None, None, "l-1", 0)))
    assert leased.options == {"lease": "l-1"}
    surrogate = decode_command(Outbox.encode(Report("failure", "a", None, "b\udc80", None, 0)))
    assert surrogate.reason == "b?"
