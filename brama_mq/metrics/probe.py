"""Keeps the active owner aware that it is active (for ``brama_owner_active``)."""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["OwnerProbe"]

log = logging.getLogger("brama_mq.metrics")


class OwnerProbe:
    """Sends the owner's queue a reply-less ``snapshot`` query every ``interval`` s.

    Single-active-consumer gives deliveries only to the active owner, and an idle active
    owner gets none; this trickle (answered by nobody, since it asks for no reply)
    lets the active one notice it is active. A standby's probe reaches the active owner.
    """

    def __init__(self, owner: Any, interval: float = 10.0) -> None:
        self.owner = owner
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="brama-owner-probe", daemon=True)

    def start(self) -> OwnerProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        from brama_mq.protocol import encode_command, make_command
        from brama_mq.protocol.clock import wall_clock_ms

        owner = self.owner
        if not owner.ready.wait(60):
            return
        key = owner.transport.topology.owner_key(owner.shard)
        link = None
        try:
            while not self._stop.is_set():
                try:
                    if link is None:
                        link = owner.transport.client_link()
                    body = encode_command(make_command("snapshot", None, None,
                                                       now_ms=wall_clock_ms()))
                    link.send(body, key)
                except Exception as exc:
                    log.debug("owner probe: %s", exc)
                self._stop.wait(self.interval)
        finally:
            if link is not None:
                link.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
