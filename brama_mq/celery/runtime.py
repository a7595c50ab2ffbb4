"""One brama_mq client, local view and outbox per Celery app and worker process.

Everything here is made lazily, in the process that uses it, the first time a guarded
task runs (or, in prefork children, right after the fork via ``worker_process_init``,
without waiting). Nothing is ever inherited across ``fork()``: an after-fork hook
forgets the parent's runtimes, and the child builds its own connections. That covers
every pool: prefork children, and the worker process itself for solo, threads and
gevent.

Settings, from the Celery app's configuration:

====================================  =========================================================
``brama_broker_url``                  RabbitMQ of the owner; default: the Celery broker
``brama_prefix``                      name prefix; default ``BRAMA_PREFIX``, else ``brama``
``brama_shards``                      owner shards; default ``BRAMA_SHARDS``, else 1
``brama_tls_ca_file``                 TLS (default ``BRAMA_TLS_*``; when brama_mq uses the Celery
``brama_tls_cert_file``               broker, Celery's ``broker_use_ssl`` keys ``ca_certs``,
``brama_tls_key_file``                ``certfile``, ``keyfile``, ``cert_reqs``); ``amqps://``
``brama_tls_verify``                  URLs turn TLS on by themselves
``brama_fail_mode``                   ``"open"`` (default) or ``"closed"``: what checks do when
                                      the view is cut off for longer than the next setting
``brama_view_max_staleness``          seconds (default 30)
``brama_view_startup_timeout``        seconds the first check waits for the view (default 5)
``brama_outbox_size``                 reports buffered while the broker is away (default 10,000)
``brama_reporter``                    the ``reporter`` of this worker's outcome reports (for
                                      ``min_reporters``); default ``BRAMA_REPORTER``, else
                                      ``<worker hostname>:<pid>`` (``celery@web-1:4711``),
                                      each pool process its own; a fixed name makes every
                                      process using it one reporter (e.g. one per host)
``brama_client``                      a ready :class:`~brama_mq.client.Brama` to use instead
                                      (tests, embedding: e.g. one on a ``MemoryTransport``)
``brama_metrics_port``                serve ``brama_guard_checks_total`` on this port from the
                                      worker's main process (all pool processes summed);
                                      default ``BRAMA_METRICS_PORT``, else off
====================================  =========================================================
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any, Final

from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from brama_mq.client.brama import Brama
from brama_mq.client.guard import GuardRuntime, runtime_for
from brama_mq.client.local_view import _ORPHANS, FAIL_MODES
from brama_mq.core.policy import MAX_REPORTER_CHARS, check_reporter
from brama_mq.errors import PolicyError
from brama_mq.metrics.guard import GUARD_CHECKS
from brama_mq.settings import Settings, SettingsError
from brama_mq.transport import transport_for

__all__ = ["AMQP_SCHEMES", "app_settings", "runtime_for_app", "shutdown_runtimes"]

log = logging.getLogger("brama_mq.celery")

AMQP_SCHEMES: Final = ("amqp", "amqps", "pyamqp", "librabbitmq", "memory")
#: A link that cannot reach the broker gives up after this long (the outbox and the view
#: retry by themselves), so a probe request never blocks a task for a minute.
RECONNECT_TIMEOUT_S: Final = 5.0

_lock = threading.RLock()
#: id(app) -> (app, runtime, owns_client), for this process only.
_RUNTIMES: dict[int, tuple[Any, GuardRuntime, bool]] = {}
#: Set when a guarded task class or function is defined in this process.
_GUARDS_DEFINED = threading.Event()
#: Set in the worker's main process when it sends task events (``-E``,
#: ``worker_send_task_events``), before the pool forks: prefork children inherit it.
TASK_EVENTS = threading.Event()
#: The worker's node name (``celery@host``), noted in its main process before the pool
#: forks (children inherit it); None outside a worker.
_WORKER_NAME: list[str] = []


def worker_reporter() -> str | None:
    """``<worker node name>:<pid>`` in a Celery worker's process (None outside one):
    the default reporter of guarded tasks, one per pool process."""
    if not _WORKER_NAME:
        return None
    pid = str(os.getpid())
    return f"{_WORKER_NAME[0][: MAX_REPORTER_CHARS - len(pid) - 1]}:{pid}"


def _conf(app: Any, name: str, default: Any = None) -> Any:
    value = app.conf.get(name)
    return default if value is None else value


def _celery_broker_url(app: Any) -> str:
    conn = app.connection_for_write()
    try:
        return str(conn.as_uri(include_password=True))
    finally:
        conn.release()


def _failover_list(value: Any) -> str | None:
    """A URL setting as one ``;``-separated failover list (Celery also takes a list)."""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value) or None
    return str(value) if value else None


def _broker_url(app: Any) -> str:
    """``brama_broker_url``, else Celery's own broker: every host of its failover list
    (``as_uri`` alone would name only the first), so the runtime rides through the loss
    of a cluster node as Celery does."""
    url = _failover_list(_conf(app, "brama_broker_url"))
    if url is None:
        celery_url = _failover_list(app.conf.get("broker_url"))
        url = celery_url if celery_url and ";" in celery_url else _celery_broker_url(app)
    hosts = []
    for one in url.split(";"):
        one = one.strip()
        scheme = one.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in AMQP_SCHEMES:
            raise SettingsError(
                f"brama_mq needs RabbitMQ, but the broker is {scheme}://...: set "
                "brama_broker_url to an amqp:// URL"
            )
        if scheme in ("pyamqp", "librabbitmq"):
            one = "amqp" + one[len(scheme):]
        hosts.append(one)
    return ";".join(hosts)


def _tls_conf(app: Any) -> dict[str, Any]:
    """TLS settings from ``brama_tls_*``, else (sharing Celery's broker) ``broker_use_ssl``."""
    out = {name: app.conf.get(f"brama_{name}")
           for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_verify")}
    celery_ssl = app.conf.get("broker_use_ssl")
    if _conf(app, "brama_broker_url") is None and isinstance(celery_ssl, dict):
        for ours, theirs in (("tls_ca_file", "ca_certs"), ("tls_cert_file", "certfile"),
                             ("tls_key_file", "keyfile")):
            if out[ours] is None:
                out[ours] = celery_ssl.get(theirs)
        if out["tls_verify"] is None and "cert_reqs" in celery_ssl:
            out["tls_verify"] = celery_ssl["cert_reqs"] != ssl.CERT_NONE
    return out


def app_settings(app: Any) -> dict[str, Any]:
    """The brama_mq settings of a Celery app (validated; see the module doc)."""
    fail_mode = _conf(app, "brama_fail_mode", "open")
    if fail_mode not in FAIL_MODES:
        raise SettingsError(f"brama_fail_mode must be one of {FAIL_MODES}, not {fail_mode!r}")
    try:
        staleness = float(_conf(app, "brama_view_max_staleness", 30.0))
        startup = float(_conf(app, "brama_view_startup_timeout", 5.0))
        outbox = int(_conf(app, "brama_outbox_size", 10_000))
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"invalid brama_* setting: {exc}") from None
    if staleness <= 0 or startup < 0 or outbox < 1:
        raise SettingsError(
            "brama_view_max_staleness must be > 0, brama_view_startup_timeout >= 0 and "
            "brama_outbox_size >= 1"
        )
    reporter = app.conf.get("brama_reporter")
    if reporter is not None:
        try:
            check_reporter(reporter)
        except PolicyError as exc:
            raise SettingsError(f"brama_reporter {exc.value!r} {exc.problem}") from None
    client = app.conf.get("brama_client")
    if client is not None:
        settings = client.settings
    else:
        settings = Settings.from_env(
            broker_url=_broker_url(app),
            prefix=_conf(app, "brama_prefix"),
            shards=_conf(app, "brama_shards"),
            heartbeat=_conf(app, "brama_heartbeat"),
            **_tls_conf(app),
        )
    return {
        "settings": settings,
        "fail_mode": fail_mode,
        "max_staleness": staleness,
        "startup_timeout": startup,
        "outbox_size": outbox,
        "reporter": reporter,
    }


def runtime_for_app(app: Any, *, wait: bool = True) -> GuardRuntime:
    """This process's runtime for ``app`` (made on first use; see the module doc)."""
    found = _RUNTIMES.get(id(app))
    if found is not None and found[0] is app:
        return found[1]
    with _lock:
        found = _RUNTIMES.get(id(app))
        if found is not None and found[0] is app:
            return found[1]
        options = app_settings(app)
        settings: Settings = options.pop("settings")
        client = app.conf.get("brama_client")
        owns = client is None
        # brama_reporter, else BRAMA_REPORTER (in the settings), else (in a worker) the
        # node name and pid; a client handed in keeps its own unless brama_reporter says.
        if options["reporter"] is None and client is None and settings.reporter is None:
            options["reporter"] = worker_reporter()
        if client is None:
            transport = transport_for(settings, reconnect_timeout=RECONNECT_TIMEOUT_S)
            client = Brama(transport=transport, settings=settings)
        runtime = runtime_for(client, wait=False, **options)
        _RUNTIMES[id(app)] = (app, runtime, owns)
        log.info(
            "brama guard for %s started in pid %d (%s, prefix %s)",
            app.main or "celery app",
            os.getpid(),
            settings.safe_broker_url,
            settings.prefix,
        )
    if wait:
        runtime.view.wait_ready(runtime.startup_timeout)
    return runtime


def shutdown_runtimes(timeout: float = 5.0) -> None:
    """Flush the outboxes (up to ``timeout`` each) and stop this process's runtimes."""
    with _lock:
        items = list(_RUNTIMES.values())
        _RUNTIMES.clear()
    for _app, runtime, owns in items:
        try:
            pending = runtime.outbox.pending()
            runtime.close(timeout)
            if owns:
                runtime.client.disconnect()
                runtime.client.transport.close()
            log.info(
                "brama guard stopped in pid %d (%d reports flushed, %d dropped in all)",
                os.getpid(),
                pending - runtime.outbox.pending(),
                runtime.outbox.counters["dropped"],
            )
        except Exception:
            log.exception("brama guard: shutting down failed")


def _after_fork() -> None:
    _ORPHANS.extend(_RUNTIMES.values())
    _RUNTIMES.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _on_process_init(**_: Any) -> None:
    """A prefork child was just forked: start its view now, without waiting for it."""
    if not _GUARDS_DEFINED.is_set():
        return
    from celery import current_app

    try:
        runtime_for_app(current_app._get_current_object(), wait=False)
    except Exception:
        log.exception("brama guard: could not start in the new worker process")


def _on_process_shutdown(**_: Any) -> None:
    shutdown_runtimes(timeout=2.0)
    GUARD_CHECKS.process_dead(os.getpid())


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """The worker's main process, before the pool forks: note whether it sends task
    events (for ``task-skipped``); turn guard metrics on if asked."""
    if getattr(sender, "task_events", False):
        TASK_EVENTS.set()
    else:
        TASK_EVENTS.clear()
    hostname = getattr(sender, "hostname", None)
    _WORKER_NAME[:] = [hostname] if isinstance(hostname, str) and hostname else []
    app = getattr(sender, "app", None)
    raw = (app.conf.get("brama_metrics_port") if app is not None else None) or os.environ.get(
        "BRAMA_METRICS_PORT"
    )
    if raw in (None, ""):
        return
    try:
        GUARD_CHECKS.enable(int(raw))
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("brama guard metrics not served (brama_metrics_port=%r): %s", raw, exc)


def _on_worker_shutdown(**_: Any) -> None:
    shutdown_runtimes(timeout=2.0)


# Connected here (not with the decorator form, which mypy cannot see through).
worker_init.connect(_on_worker_init, weak=False)
worker_process_init.connect(_on_process_init, weak=False)
worker_process_shutdown.connect(_on_process_shutdown, weak=False)
worker_shutdown.connect(_on_worker_shutdown, weak=False)
