"""The dashboard's server: a Starlette app run by uvicorn, fed by a transient subscription.

Like ``brama-mq watch``, it costs the owner nothing while nobody looks: one snapshot
request at start (and again after the subscription's connection was replaced, when a
transient queue may have missed events, or until an owner first answers), then the
events of one transient subscription bound to ``#``. The subscription's handler thread
hands each event to the event loop (``loop.call_soon_threadsafe``), where the
:class:`~brama_mq.dashboard.board.Board` applies it and the
:class:`~brama_mq.dashboard.feed.Broadcast` sends the change to every open page as a
server-sent event.

Routes: ``GET /`` the page (static files under ``/static``, package data, no CDN);
``GET /api/state`` what a page starts from, as JSON; ``GET /api/events`` the stream
(``snapshot`` first, then a ``change`` per event); ``GET /healthz`` (503 once the
subscription stopped); ``POST /api/admin/{open,close,reset}`` only with an admin token
(404 without one; 401 without ``Authorization: Bearer``, 403 with a wrong token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from types import FrameType
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brama_mq.client.brama import Brama
from brama_mq.dashboard.board import Board
from brama_mq.dashboard.feed import Broadcast, sse
from brama_mq.errors import (
    BramaError,
    CommandRejectedError,
    InvalidNameError,
    NotRegisteredError,
    PolicyError,
    RequestTimeoutError,
)
from brama_mq.protocol import Event
from brama_mq.subscribe import subscribe
from brama_mq.subscribe.subscription import Subscription
from brama_mq.transport import Transport

__all__ = ["ADMIN_ACTIONS", "Dashboard"]

log = logging.getLogger("brama_mq.dashboard")

ADMIN_ACTIONS: Final = ("open", "close", "reset")
NO_OWNER_NOTE: Final = (
    "no owner answered (is `brama-mq worker` running on this prefix?); "
    "states fill in as events arrive"
)
#: Everything the page loads comes from this server; nothing inline, nothing remote.
_CSP: Final = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class _SecurityHeaders:
    """Adds the content security policy and friends to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", _CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the dashboard when a signal asks it to stop (so the
    open event streams end instead of holding the graceful shutdown up)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class Dashboard:
    """The dashboard of one deployment (one transport, i.e. one broker and prefix).

    ``open()`` subscribes and reads the owner's snapshot (blocking; BramaError when the
    broker or the topology is missing); ``app`` is the ASGI app; ``serve(sock)`` runs it
    until SIGINT/SIGTERM; ``close()`` ends the subscription (the transport stays the
    caller's). ``admin_token`` None: admin actions are off.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        admin_token: str | None = None,
        request_timeout: float = 5.0,
        board: Board | None = None,
        title: str = "",
        resync_interval: float = 5.0,
        keepalive: float = 15.0,
    ) -> None:
        self.transport = transport
        self.admin_token = admin_token
        self.request_timeout = request_timeout
        self.board = board or Board()
        self.feed = Broadcast()
        self.title = title
        self.resync_interval = resync_interval
        self.keepalive = keepalive
        self.note = ""
        self.owner_answered = False
        self.closing = False
        self._sub: Subscription | None = None
        self._client: Brama | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: list[Event] = []
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnects = 0
        self._index: str | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> Dashboard:
        """Subscribe to every event, then read the owner's snapshot (blocking)."""
        if self._sub is None:
            self._sub = subscribe(handler=self._on_event, transport=self.transport).start()
            self._client = Brama(transport=self.transport, request_timeout=self.request_timeout)
            self._reconnects = self._reconnect_count()
            self._take_snapshot(self._read_snapshot(), since=None)
        return self

    def close(self) -> None:
        """End the subscription and the client's link (idempotent)."""
        sub, self._sub = self._sub, None
        client, self._client = self._client, None
        if sub is not None:
            with contextlib.suppress(BramaError):
                sub.close()
        if client is not None:
            with contextlib.suppress(BramaError):
                client.disconnect()

    def stop_streams(self) -> None:
        """Let the open event streams end (called from a signal handler: only a flag)."""
        self.closing = True

    def serve(self, sock: socket.socket, *, log_level: str = "warning") -> None:
        """Serve on the bound socket ``sock`` until a signal stops the server."""
        config = uvicorn.Config(
            self.app, log_level=log_level, access_log=False, lifespan="on", ws="none",
            timeout_graceful_shutdown=3, server_header=False,
        )
        _Server(config, self.stop_streams).run(sockets=[sock])

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
            early, self._early = self._early, []
        for event in early:
            self._apply(event)
        self._tasks.append(loop.create_task(self._resync_loop()))
        try:
            yield
        finally:
            self.closing = True
            self.feed.close()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._tasks.clear()
            with self._lock:
                self._loop = None

    # ------------------------------------------------------------------ events
    def _on_event(self, event: Event) -> None:
        """The subscription's handler (its own thread): hand the event to the loop."""
        with self._lock:
            loop = self._loop
            if loop is None:
                self._early.append(event)
                return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(self._apply, event)

    def _apply(self, event: Event) -> None:
        self.feed.publish(sse("change", self.board.apply(event)))

    def _reconnect_count(self) -> int:
        sub = self._sub
        if sub is None:
            return 0
        try:
            return int(sub.stats().get("reconnects", 0))
        except BramaError:
            return self._reconnects

    def _read_snapshot(self) -> list[dict[str, Any]] | str:
        """The owner's status rows, or a note saying why there are none (blocking)."""
        client = self._client
        if client is None:
            return "not open"
        try:
            return client.snapshot()
        except RequestTimeoutError:
            return NO_OWNER_NOTE
        except BramaError as exc:
            return f"no snapshot ({exc}); states fill in as events arrive"

    def _take_snapshot(self, rows: list[dict[str, Any]] | str, since: int | None) -> None:
        if isinstance(rows, str):
            self.note = rows
            return
        self.owner_answered = True
        self.note = ""
        self.board.seed(rows, since=since)

    async def _resync_loop(self) -> None:
        """Read the snapshot again after a reconnect, and until an owner first answers."""
        waited = 0.0
        while True:
            await asyncio.sleep(1.0)
            waited += 1.0
            reconnects = self._reconnect_count()
            again = reconnects != self._reconnects
            if not again and (self.owner_answered or waited < self.resync_interval):
                continue
            self._reconnects, waited = reconnects, 0.0
            since = self.board.version
            rows = await asyncio.to_thread(self._read_snapshot)
            self._take_snapshot(rows, since)
            if again and not isinstance(rows, str):
                self.note = "reconnected: states read again from the owner"
            if again or not isinstance(rows, str):
                self.feed.publish(sse("snapshot", self.state()))

    def state(self) -> dict[str, Any]:
        """What a page starts from: the board's snapshot plus the server's settings."""
        out = self.board.snapshot()
        out.update(admin=self.admin_token is not None, note=self.note, title=self.title)
        return out

    # ------------------------------------------------------------------ routes
    def _build_app(self) -> Starlette:
        static = StaticFiles(packages=[("brama_mq.dashboard", "static")])
        return Starlette(
            routes=[
                Route("/", self._page),
                Route("/healthz", self._health),
                Route("/api/state", self._state),
                Route("/api/events", self._events),
                Route("/api/admin/{action}", self._admin, methods=["POST"]),
                Mount("/static", app=static, name="static"),
            ],
            middleware=[Middleware(_SecurityHeaders)],
            lifespan=self._lifespan,
        )

    async def _page(self, _request: Request) -> Response:
        if self._index is None:
            files = resources.files("brama_mq.dashboard") / "static" / "index.html"
            self._index = files.read_text(encoding="utf-8")
        return HTMLResponse(self._index, headers={"Cache-Control": "no-cache"})

    async def _health(self, _request: Request) -> Response:
        sub = self._sub
        up = sub is not None and not sub.closed
        body = {
            "status": "ok" if up else "down",
            "subscription": "up" if up else "down",
            "owner_answered": self.owner_answered,
            "pages": len(self.feed),
            "events_seen": self.board.events_seen,
        }
        return JSONResponse(body, status_code=200 if up else 503)

    async def _state(self, _request: Request) -> Response:
        return JSONResponse(self.state(), headers={"Cache-Control": "no-cache"})

    async def _events(self, _request: Request) -> Response:
        listener = self.feed.join()
        first = "retry: 1000\n\n" + sse("snapshot", self.state())

        async def stream() -> AsyncIterator[str]:
            try:
                yield first
                idle = 0.0
                while True:
                    try:
                        message = await asyncio.wait_for(listener.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if self.closing:
                            return
                        idle += 1.0
                        if idle >= self.keepalive:
                            idle = 0.0
                            yield ": keep-alive\n\n"
                        continue
                    if message is None:
                        return
                    idle = 0.0
                    yield message
            finally:
                self.feed.leave(listener)

        return StreamingResponse(
            stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _admin(self, request: Request) -> Response:
        token = self.admin_token
        if token is None:
            return _error(404, "admin actions are off: start the dashboard with --admin")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _error(401, "admin actions need 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": 'Bearer realm="brama-mq dashboard"'})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _error(403, "wrong admin token")
        action = request.path_params["action"]
        if action not in ADMIN_ACTIONS:
            return _error(404, f"unknown action {action!r}; valid: {', '.join(ADMIN_ACTIONS)}")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON: {\"connection\": ..., \"scope\": ...}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        connection, scope = body.get("connection"), body.get("scope")
        reason = body.get("reason") or f"{action} from the dashboard"
        if not isinstance(connection, str) or not (scope is None or isinstance(scope, str)):
            return _error(400, "connection must be a string, scope a string or null")
        if not isinstance(reason, str):
            return _error(400, "reason must be a string")
        kwargs: dict[str, Any] = {"scope": scope, "reason": reason, "wait": True}
        if action == "open" and "expiry_ms" in body:
            expiry = body["expiry_ms"]
            if expiry is not None and (isinstance(expiry, bool) or not isinstance(expiry, int)):
                return _error(400, "expiry_ms must be an integer or null (until closed)")
            kwargs["expiry_ms"] = expiry
        client = self._client
        if client is None:
            return _error(503, "the dashboard is not connected")
        try:
            applied = await asyncio.to_thread(getattr(client, action), connection, **kwargs)
        except (InvalidNameError, PolicyError) as exc:
            return _error(400, str(exc))
        except NotRegisteredError as exc:
            return _error(404, str(exc))
        except RequestTimeoutError:
            return _error(504, f"no owner answered within {self.request_timeout} s")
        except CommandRejectedError as exc:
            return _error(409, f"the owner refused it: {exc}")
        except BramaError as exc:
            return _error(502, str(exc))
        log.info("admin %s %s/%s: %s", action, scope, connection,
                 applied.status if applied else "sent")
        if applied is None:
            return JSONResponse({"status": "sent", "events": []})
        return JSONResponse({"status": applied.status, "events": applied.event_names})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
