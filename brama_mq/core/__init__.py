"""The sans-I/O core: breaker engine, policy, events, routing-key codec, topic matcher.

Nothing in this package reads a clock, sleeps, or imports kombu/celery; it takes
``(command, now)`` and returns events. A test pins that.
"""

from brama_mq.core.engine import (
    ALREADY_REGISTERED,
    APPLIED,
    INVALID,
    NOT_REGISTERED,
    Advance,
    Command,
    Engine,
    Probe,
    Result,
)
from brama_mq.core.events import (
    CLOSED,
    CRITICAL_EVENTS,
    EVENT_TYPES,
    HALF_OPEN,
    OPEN,
    STATES,
    Event,
)
from brama_mq.core.policy import DEFAULT_POLICY, OPTION_NAMES, Policy

__all__ = [
    "ALREADY_REGISTERED",
    "APPLIED",
    "CLOSED",
    "CRITICAL_EVENTS",
    "DEFAULT_POLICY",
    "EVENT_TYPES",
    "HALF_OPEN",
    "INVALID",
    "NOT_REGISTERED",
    "OPEN",
    "OPTION_NAMES",
    "STATES",
    "Advance",
    "Command",
    "Engine",
    "Event",
    "Policy",
    "Probe",
    "Result",
]
