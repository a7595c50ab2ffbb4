"""The public client API."""

from brama_mq.client.brama import Applied, Brama
from brama_mq.client.default import default_client, set_default_client
from brama_mq.client.guard import ADMIT_CLOSED, Admission, Guard, GuardedCall
from brama_mq.client.local_view import LocalView, ViewEntry
from brama_mq.errors import CommandRejectedError

__all__ = [
    "ADMIT_CLOSED",
    "Admission",
    "Applied",
    "Brama",
    "CommandRejectedError",
    "Guard",
    "GuardedCall",
    "LocalView",
    "ViewEntry",
    "default_client",
    "set_default_client",
]
