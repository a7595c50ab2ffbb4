"""brama_mq: Brama's circuit breakers and status notifications over RabbitMQ.

The public API is what this module exports; everything in submodules is private unless
re-exported here (a test pins the list). Names load lazily, so ``import brama_mq.core``
(the sans-I/O engine) does not drag in pydantic, kombu or the client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from brama_mq import telemetry
    from brama_mq.client import Applied, Brama, default_client, set_default_client
    from brama_mq.client.default import (
        available,
        close_circuit,
        configure,
        failure,
        guard,
        guarded,
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
        AccessRefusedError,
        AlreadyRegisteredError,
        BramaError,
        BrokerUnavailableError,
        CircuitOpenError,
        CommandRejectedError,
        ConfirmError,
        FilterError,
        InvalidNameError,
        NoTopologyError,
        NotRegisteredError,
        OutboxFullError,
        PolicyError,
        ProtocolError,
        RequestTimeoutError,
        ShardMismatchError,
        TransportError,
    )
    from brama_mq.protocol import Event
    from brama_mq.settings import Settings
    from brama_mq.subscribe import Subscription, subscribe, subscribe_async, unsubscribe
    from brama_mq.subscribe.kombu_queue import kombu_queue

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Applied": "brama_mq.client",
    "Brama": "brama_mq.client",
    "default_client": "brama_mq.client",
    "set_default_client": "brama_mq.client",
    "available": "brama_mq.client.default",
    "close_circuit": "brama_mq.client.default",
    "configure": "brama_mq.client.default",
    "failure": "brama_mq.client.default",
    "guard": "brama_mq.client.default",
    "guarded": "brama_mq.client.default",
    "open_circuit": "brama_mq.client.default",
    "register": "brama_mq.client.default",
    "reset_circuit": "brama_mq.client.default",
    "status": "brama_mq.client.default",
    "success": "brama_mq.client.default",
    "unregister": "brama_mq.client.default",
    "CLOSED": "brama_mq.core.events",
    "CRITICAL_EVENTS": "brama_mq.core.events",
    "EVENT_TYPES": "brama_mq.core.events",
    "HALF_OPEN": "brama_mq.core.events",
    "OPEN": "brama_mq.core.events",
    "Policy": "brama_mq.core.policy",
    "AccessRefusedError": "brama_mq.errors",
    "AlreadyRegisteredError": "brama_mq.errors",
    "BramaError": "brama_mq.errors",
    "BrokerUnavailableError": "brama_mq.errors",
    "CircuitOpenError": "brama_mq.errors",
    "CommandRejectedError": "brama_mq.errors",
    "ConfirmError": "brama_mq.errors",
    "FilterError": "brama_mq.errors",
    "InvalidNameError": "brama_mq.errors",
    "NotRegisteredError": "brama_mq.errors",
    "OutboxFullError": "brama_mq.errors",
    "PolicyError": "brama_mq.errors",
    "ProtocolError": "brama_mq.errors",
    "RequestTimeoutError": "brama_mq.errors",
    "NoTopologyError": "brama_mq.errors",
    "ShardMismatchError": "brama_mq.errors",
    "TransportError": "brama_mq.errors",
    "Event": "brama_mq.protocol",
    "Settings": "brama_mq.settings",
    "Subscription": "brama_mq.subscribe",
    "subscribe": "brama_mq.subscribe",
    "subscribe_async": "brama_mq.subscribe",
    "unsubscribe": "brama_mq.subscribe",
    "kombu_queue": "brama_mq.subscribe.kombu_queue",
}

__all__ = [
    "CLOSED",
    "CRITICAL_EVENTS",
    "EVENT_TYPES",
    "HALF_OPEN",
    "OPEN",
    "AccessRefusedError",
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
    "NoTopologyError",
    "NotRegisteredError",
    "OutboxFullError",
    "Policy",
    "PolicyError",
    "ProtocolError",
    "RequestTimeoutError",
    "Settings",
    "ShardMismatchError",
    "Subscription",
    "TransportError",
    "__version__",
    "available",
    "close_circuit",
    "configure",
    "default_client",
    "failure",
    "guard",
    "guarded",
    "kombu_queue",
    "open_circuit",
    "register",
    "reset_circuit",
    "set_default_client",
    "status",
    "subscribe",
    "subscribe_async",
    "success",
    "telemetry",
    "unregister",
    "unsubscribe",
]

#: Submodules offered as attributes of the package (``brama_mq.telemetry.attach(...)``).
_SUBMODULES = {"telemetry"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"brama_mq.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'brama_mq' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
