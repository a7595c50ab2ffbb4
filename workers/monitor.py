"""The status-notification spec's ``MyApp.ConnectionMonitor``, made real.

It subscribes to ``state_change`` and raises an alert when a circuit opens: a log line
(``ALERT circuit opened ...``) and, with ``--webhook URL``, a JSON POST to that URL
(Slack-style ``{"text": ...}`` plus the event itself).

Run it beside the owner::

    python workers/monitor.py --webhook https://hooks.example/brama
    python workers/monitor.py --name ops-alerts --scope payments   # durable, shared

Without ``--name`` it is a transient subscription: it sees circuits that open while it
runs. With ``--name`` the subscription is durable: alerts raised while the monitor was
down are delivered when it comes back, several monitors share the work, and a webhook
that keeps failing is retried and then dead-lettered (``{prefix}.sub.<name>.dead``)
with the error instead of being lost. SIGTERM or Ctrl-C stops it (exit 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import brama_mq
from brama_mq import OPEN, Event, Subscription
from brama_mq.errors import breaker_name

log = logging.getLogger("brama_mq.monitor")


class ConnectionMonitor:
    """Alerts on every ``state_change`` whose new state is open."""

    def __init__(
        self,
        webhook_url: str | None = None,
        *,
        timeout: float = 5.0,
        post: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.webhook_url = webhook_url
        self.timeout = timeout
        self._post = post or self._http_post
        self.alerts = 0

    def subscribe(self, **options: Any) -> Subscription:
        """Subscribe this monitor (``options`` go to :func:`brama_mq.subscribe`)."""
        return brama_mq.subscribe(events=["state_change"], handler=self, **options)

    def handle_event(self, event: Event) -> None:
        """Called once per event (a raise makes a named subscription retry it)."""
        if event.event == "state_change" and event.new_state == OPEN:
            self.alert(event)

    def alert(self, event: Event) -> None:
        where = breaker_name(event.scope, event.connection)
        reason = f": {event.reason}" if event.reason else ""
        until = event.data.get("open_until")
        text = f"circuit opened for {where}{reason}"
        if isinstance(until, int):
            text += f" (retry after {until - event.timestamp} ms)"
        log.warning("ALERT %s [seq %d]", text, event.seq)
        self.alerts += 1
        if self.webhook_url:
            self._post(self.webhook_url, {"text": f"Brama: {text}", "event": event.model_dump()})

    def _http_post(self, url: str, payload: dict[str, Any]) -> None:
        """POST JSON; an HTTP error or timeout raises, so the subscription retries."""
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            response.read()


def _beat(sub: Subscription, path: str, every: float = 5.0) -> None:
    """Keep ``path`` fresh while the subscription is open: its age is the healthcheck."""
    while not sub.closed:
        with open(path, "a"):
            os.utime(path)
        time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=None, help="broker URL [env BRAMA_BROKER_URL]")
    parser.add_argument("--prefix", default=None, help="name prefix [env BRAMA_PREFIX]")
    parser.add_argument("--webhook", default=None, help="POST alerts to this URL")
    parser.add_argument("--name", default=None, help="durable subscription name")
    parser.add_argument("--scope", action="append", help="only this scope (repeatable)")
    parser.add_argument("--connection", action="append", help="only this connection")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--health-file", default=None,
                        help="touch this file every 5 s while subscribed (a healthcheck "
                        "reads its age)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    monitor = ConnectionMonitor(args.webhook)
    try:
        sub = monitor.subscribe(name=args.name, scope=args.scope, connection=args.connection,
                                broker_url=args.broker, prefix=args.prefix)
    except brama_mq.BramaError as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, _frame: Any) -> None:
        # close() joins threads and talks to the broker: not inside the signal handler
        threading.Thread(target=sub.close, name="monitor-stop").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("monitor watching %s for circuits that open", sub.bindings)
    if args.health_file:
        threading.Thread(target=_beat, args=(sub, args.health_file), name="monitor-health",
                         daemon=True).start()
    sub.run()
    log.info("monitor stopped after %d alert(s)", monitor.alerts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
