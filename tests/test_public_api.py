"""The public facade: exactly these names, each importable, lazily loaded."""

from __future__ import annotations

import subprocess
import sys

import brama_mq

EXPECTED = {
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
    "success",
    "unregister",
}


def test_exported_names_are_pinned() -> None:
    """Adding or removing a public name is a deliberate change to this list."""
    assert set(brama_mq.__all__) >= EXPECTED
    extra = set(brama_mq.__all__) - EXPECTED
    # Later issues add names (subscribe, guard, ...): they must be listed here too.
    assert extra <= {"subscribe", "subscribe_async", "unsubscribe", "Subscription",
                     "telemetry"}, extra


def test_every_exported_name_resolves() -> None:
    """Each name in __all__ is an attribute of the package."""
    for name in brama_mq.__all__:
        assert getattr(brama_mq, name) is not None, name


def test_importing_the_package_is_light() -> None:
    """`import brama_mq` loads neither kombu nor pydantic until a name needs them."""
    code = "import sys, brama_mq; print('kombu' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_telemetry_is_the_hooks_module() -> None:
    """`brama_mq.telemetry` is the module with attach/detach/execute."""
    assert callable(brama_mq.telemetry.attach) and callable(brama_mq.telemetry.detach)
    assert brama_mq.telemetry is __import__("brama_mq.telemetry").telemetry


def test_unknown_attribute_is_an_attribute_error() -> None:
    """A typo on the package fails like on any module."""
    try:
        brama_mq.regster  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "regster" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
