"""brama_mq: Brama's circuit breakers and status notifications over RabbitMQ.

The public API is what this module exports; everything in submodules is private unless
re-exported here (a test pins the list).
"""

from brama_mq.client import Applied, Brama, default_client, set_default_client
from brama_mq.client.default import (
    available,
    close_circuit,
    configure,
    failure,
    open_circuit,
    register,
    reset_circuit,
    status,
    success,
    unregister,
)
from brama_mq.core.events import CLOSED, CRITICAL_EVENTS, EVENT_TYPES, HALF_OPEN, OPEN
from brama_mq.core.policy import Policy
from brama_mq.errors import (
    AlreadyRegisteredError,
    BramaError,
    BrokerUnavailableError,
    CircuitOpenError,
    CommandRejectedError,
    ConfirmError,
    FilterError,
    InvalidNameError,
    NotRegisteredError,
    OutboxFullError,
    PolicyError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
)
from brama_mq.protocol import Event
from brama_mq.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "CLOSED",
    "CRITICAL_EVENTS",
    "EVENT_TYPES",
    "HALF_OPEN",
    "OPEN",
    "AlreadyRegisteredError",
    "Applied",
    "Brama",
    "BramaError",
    "BrokerUnavailableError",
    "CircuitOpenError",
    "CommandRejectedError",
    "ConfirmError",
    "Event",
    "FilterError",
    "InvalidNameError",
    "NotRegisteredError",
    "OutboxFullError",
    "Policy",
    "PolicyError",
    "ProtocolError",
    "RequestTimeoutError",
    "Settings",
    "TransportError",
    "__version__",
    "available",
    "close_circuit",
    "configure",
    "default_client",
    "failure",
    "open_circuit",
    "register",
    "reset_circuit",
    "set_default_client",
    "status",
    "success",
    "unregister",
]
