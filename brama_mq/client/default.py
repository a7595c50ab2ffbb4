"""A module-level default client, so ``brama_mq.failure("payment_api")`` reads like Brama.

Created on first use from ``BRAMA_*`` settings; replace it with ``set_default_client``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from brama_mq.client.brama import Applied, Brama
from brama_mq.client.guard import GuardedCall

_lock = threading.Lock()
_default: Brama | None = None


def default_client() -> Brama:
    global _default
    client = _default
    if client is None:
        with _lock:
            if _default is None:
                _default = Brama()
            client = _default
    return client


def set_default_client(client: Brama | None) -> Brama | None:
    """Install ``client`` as the default (None: build a new one on next use); returns the old."""
    global _default
    with _lock:
        old, _default = _default, client
    return old


def register(connection: str, **kwargs: Any) -> Applied | None:
    return default_client().register(connection, **kwargs)


def unregister(connection: str, **kwargs: Any) -> Applied | None:
    return default_client().unregister(connection, **kwargs)


def success(
    connection: str,
    *,
    scope: str | None = None,
    lease: str | None = None,
    duration_ms: float | None = None,
    wait: bool = False,
) -> Applied | None:
    """``Brama.success`` of the default client (``duration_ms`` checked before sending)."""
    return default_client().success(
        connection, scope=scope, lease=lease, duration_ms=duration_ms, wait=wait
    )


def failure(
    connection: str,
    *,
    scope: str | None = None,
    reason: str | None = None,
    lease: str | None = None,
    duration_ms: float | None = None,
    wait: bool = False,
) -> Applied | None:
    """``Brama.failure`` of the default client (``duration_ms`` checked before sending)."""
    return default_client().failure(
        connection, scope=scope, reason=reason, lease=lease, duration_ms=duration_ms, wait=wait
    )


def open_circuit(connection: str, **kwargs: Any) -> Applied | None:
    return default_client().open(connection, **kwargs)


def close_circuit(connection: str, **kwargs: Any) -> Applied | None:
    return default_client().close(connection, **kwargs)


def reset_circuit(connection: str, **kwargs: Any) -> Applied | None:
    return default_client().reset(connection, **kwargs)


def configure(connection: str | None = None, **kwargs: Any) -> Applied | None:
    return default_client().configure(connection, **kwargs)


def status(connection: str, **kwargs: Any) -> dict[str, Any]:
    return default_client().status(connection, **kwargs)


def available(connection: str, **kwargs: Any) -> bool:
    return default_client().available(connection, **kwargs)


def guard(connection: str, **kwargs: Any) -> GuardedCall:
    """``with brama_mq.guard("payment_api", scope="payments"):`` (see ``Brama.guard``)."""
    return default_client().guard(connection, **kwargs)


def guarded(connection: str, **kwargs: Any) -> Callable[[Any], Any]:
    """``@brama_mq.guarded("payment_api")`` for sync and async functions (``Brama.guarded``).

    The default client is resolved when the decorator is applied."""
    return default_client().guarded(connection, **kwargs)
