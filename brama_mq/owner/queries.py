"""Read-side RPCs the owner answers over direct reply-to: status, snapshot, probes.

They never emit events; ``acquire_probe`` is here (not in the command path) because it
answers the caller rather than telling subscribers anything.
"""

from __future__ import annotations

from typing import Any

from brama_mq.core.engine import Engine
from brama_mq.errors import breaker_name
from brama_mq.protocol import Command, Reply


def answer_query(engine: Engine, command: Command, now: int) -> Reply:
    op = command.op
    scope, connection = command.scope, command.connection
    if op == "snapshot":
        if connection is not None:
            return _one(engine, scope, connection, now)
        statuses: Any = engine.statuses(now=now) if scope is None else engine.statuses(scope, now)
        return Reply(ok=True, result={"now": now, "connections": statuses})
    if connection is None:
        return Reply(ok=False, error=f"{op} needs a connection")
    if (scope, connection) not in engine:
        where = breaker_name(scope, connection)
        return Reply(
            ok=False, error=f"{where} is not registered", result={"status": "not_registered"}
        )
    if op == "status":
        return _one(engine, scope, connection, now)
    if op == "acquire_probe":
        probe = engine.acquire_probe(scope, connection, now)
        return Reply(ok=True, result=probe.to_dict())
    if op == "release_probe":
        lease = command.options.get("lease")
        if not isinstance(lease, str):
            return Reply(ok=False, error="release_probe needs options.lease (a string)")
        return Reply(ok=True, result={"released": engine.release_probe(scope, connection, lease)})
    return Reply(ok=False, error=f"unknown query {op!r}")


def _one(engine: Engine, scope: str | None, connection: str, now: int) -> Reply:
    try:
        return Reply(ok=True, result=engine.status(scope, connection, now))
    except KeyError:
        where = breaker_name(scope, connection)
        return Reply(
            ok=False, error=f"{where} is not registered", result={"status": "not_registered"}
        )
