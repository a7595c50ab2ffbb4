"""The wire protocol: section 5's commands, events and replies, and their JSON codec."""

from brama_mq.protocol.codec import (
    CONTENT_TYPE,
    MAX_BYTES,
    MAX_DEPTH,
    command_body,
    decode_command,
    decode_event,
    decode_reply,
    encode_command,
    encode_event,
    encode_reply,
    make_command,
    new_command_id,
)
from brama_mq.protocol.models import (
    COMMAND_OPS,
    CONNECTION_OPTIONAL_OPS,
    PROTOCOL_VERSION,
    QUERY_OPS,
    Command,
    Event,
    Op,
    Reply,
)

__all__ = [
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
]
