"""The public client API."""

from brama_mq.client.brama import Applied, Brama
from brama_mq.client.default import default_client, set_default_client
from brama_mq.errors import CommandRejectedError

__all__ = ["Applied", "Brama", "CommandRejectedError", "default_client", "set_default_client"]
