"""An example Celery app: guarded tasks calling a fake payment service.

Run it against RabbitMQ (three terminals, or background them)::

    brama-mq worker                                                  # the state owner
    celery -A workers.celery_app worker --pool prefork --concurrency 2 --loglevel INFO
    python -m workers.celery_app register --max-attempts 3 --expiry-ms 5000
    python -m workers.celery_app charge 20                           # enqueue 20 charges
    python -m workers.celery_app fail 1.0                            # the service breaks
    python -m workers.celery_app charge 20                           # 3 fail, then deferred
    python -m workers.celery_app fail 0                              # healthy again
    python -m workers.celery_app status

``charge`` is guarded with ``@guarded(..., on_open="retry")``: once the circuit opens,
queued charges are deferred (not failed, and without using their retry budget) until
the circuit half-opens; then one probe per permit runs, and a success closes it.
``refund`` shows the other form, ``base=GuardedTask`` with ``on_open="raise"``.

The fake service keeps its state in a directory (``PAYMENT_SERVICE_DIR``, default
``/tmp/brama-payment-service``) so every worker process sees a change at once:
``control.json`` holds ``failure_rate`` (0..1) and ``latency_s``; ``calls.log`` gets a
JSON line per call (time, pid, order, outcome). Environment: ``CELERY_BROKER_URL``
(default RabbitMQ on 127.0.0.1), ``BRAMA_BROKER_URL`` (default: the Celery broker),
``BRAMA_PREFIX`` (default ``brama``), ``PAYMENTS_QUEUE`` (default ``payments``),
``BRAMA_FAIL_MODE``, ``BRAMA_VIEW_MAX_STALENESS``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from celery import Celery

from brama_mq.celery import GuardedTask, guarded

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("PAYMENTS_QUEUE", "payments")
CONNECTION = "payment_api"
SCOPE = "payments"


class PaymentServiceError(Exception):
    """The payment service failed (an outage): counts against the circuit."""


class CardDeclined(Exception):
    """A business answer, not an outage: ignored by the circuit."""


class FakePaymentService:
    """A payment API whose failure rate and latency can be changed while it runs."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(directory or os.environ.get("PAYMENT_SERVICE_DIR")
                        or "/tmp/brama-payment-service")
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def control_file(self) -> Path:
        return self.dir / "control.json"

    @property
    def log_file(self) -> Path:
        return self.dir / "calls.log"

    def control(self) -> dict[str, Any]:
        try:
            data = json.loads(self.control_file.read_text())
        except (OSError, ValueError):
            data = {}
        return {"failure_rate": float(data.get("failure_rate", 0.0)),
                "latency_s": float(data.get("latency_s", 0.0))}

    def set(self, *, failure_rate: float | None = None, latency_s: float | None = None) -> None:
        """Change the behaviour for every process (atomic file replace)."""
        data = self.control()
        if failure_rate is not None:
            data["failure_rate"] = failure_rate
        if latency_s is not None:
            data["latency_s"] = latency_s
        tmp = self.control_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.control_file)

    def _log(self, **record: Any) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def calls(self) -> list[dict[str, Any]]:
        """Every call so far, across processes."""
        try:
            text = self.log_file.read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def charge(self, order_id: str, amount_cents: int) -> dict[str, Any]:
        started = time.time() * 1000.0
        control = self.control()
        if control["latency_s"]:
            time.sleep(control["latency_s"])
        ok = random.random() >= control["failure_rate"]
        self._log(t=started, pid=os.getpid(), order=order_id, ok=ok)
        if not ok:
            raise PaymentServiceError(f"payment service unavailable (order {order_id})")
        if amount_cents <= 0:
            raise CardDeclined(f"declined: amount {amount_cents}")
        return {"order": order_id, "charged": amount_cents}


service = FakePaymentService()

app = Celery("payments", broker=BROKER_URL)
app.conf.update(
    brama_broker_url=os.environ.get("BRAMA_BROKER_URL") or None,
    brama_prefix=os.environ.get("BRAMA_PREFIX") or None,
    brama_fail_mode=os.environ.get("BRAMA_FAIL_MODE", "open"),
    brama_view_max_staleness=float(os.environ.get("BRAMA_VIEW_MAX_STALENESS", "30")),
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True, name="payments.charge")
@guarded(CONNECTION, scope=SCOPE, on_open="retry", record=(PaymentServiceError, TimeoutError),
         ignore=(CardDeclined,))
def charge(self: Any, order_id: str, amount_cents: int = 1000) -> dict[str, Any]:
    """Charge an order through the payment service, behind the payment_api circuit."""
    return service.charge(order_id, amount_cents)


@app.task(base=GuardedTask, name="payments.refund", brama_connection=CONNECTION,
          brama_scope=SCOPE, brama_on_open="raise", brama_record=(PaymentServiceError,))
def refund(order_id: str, amount_cents: int = 1000) -> dict[str, Any]:
    """Refund an order; while the circuit is open it fails fast with CircuitOpenError."""
    return service.charge(order_id, amount_cents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.celery_app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register payment_api with the owner")
    reg.add_argument("--max-attempts", type=int, default=3)
    reg.add_argument("--expiry-ms", type=int, default=5000)
    reg.add_argument("--half-open-permits", type=int, default=1)
    fail = sub.add_parser("fail", help="set the service's failure rate (0..1)")
    fail.add_argument("rate", type=float)
    lat = sub.add_parser("latency", help="set the service's latency in seconds")
    lat.add_argument("seconds", type=float)
    ch = sub.add_parser("charge", help="enqueue N charges")
    ch.add_argument("n", type=int)
    sub.add_parser("status", help="the circuit's state and the service's calls")
    args = parser.parse_args(argv)

    if args.cmd == "fail":
        service.set(failure_rate=args.rate)
    elif args.cmd == "latency":
        service.set(latency_s=args.seconds)
    elif args.cmd == "charge":
        stamp = int(time.time())
        for i in range(args.n):
            charge.delay(f"order-{stamp}-{i}")
    else:
        from brama_mq import Brama
        from brama_mq.celery import app_settings

        with Brama(settings=app_settings(app)["settings"]) as client:
            if args.cmd == "register":
                applied = client.register(
                    CONNECTION, scope=SCOPE, wait=True, max_attempts=args.max_attempts,
                    expiry_ms=args.expiry_ms, half_open_permits=args.half_open_permits,
                )
                print(applied.status if applied else "sent")
            else:
                status = client.status(CONNECTION, scope=SCOPE)
                calls = service.calls()
                print(json.dumps({"state": status["state"],
                                  "failure_count": status["failure_count"],
                                  "calls": len(calls),
                                  "failed": sum(1 for c in calls if not c["ok"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
