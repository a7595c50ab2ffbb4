"""``async for event in brama_mq.subscribe_async(...)``: the same subscription, awaited.

The broker side is the same :class:`~brama_mq.subscribe.subscription.Subscription` (the
pump thread owns the connection); the event loop only waits on the subscription's inbox,
woken by ``loop.call_soon_threadsafe`` when events arrive, so no thread blocks on the
loop's behalf and a cancelled ``async for`` never takes an event it does not return.
Connecting, binding and closing are blocking calls and run in a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from brama_mq.errors import BramaError
from brama_mq.subscribe.subscription import Subscription, _Batch, _Collector

__all__ = ["AsyncSubscription"]

log = logging.getLogger("brama_mq.subscribe")


class AsyncSubscription:
    """An async iterator and async context manager over a :class:`Subscription`.

    ``async with subscribe_async(...) as sub: async for event in sub: ...``; or
    ``await sub.run()`` with a handler (plain or ``async def``; ``handle_event`` /
    ``handle_batch`` may be coroutines too). Acks, retries, dead-lettering, batching and
    duplicate dropping behave as in the synchronous form.
    """

    def __init__(self, factory: Callable[[], Subscription]) -> None:
        self._factory = factory
        self._sub: Subscription | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def subscription(self) -> Subscription:
        """The underlying subscription (bindings, stats, dropped...); open() first."""
        if self._sub is None:
            raise RuntimeError("the subscription is not open yet: await open() or iterate it")
        return self._sub

    async def open(self) -> AsyncSubscription:
        """Connect and bind (in a worker thread); iterating or ``async with`` does it too."""
        if self._sub is None:
            sub = await asyncio.to_thread(self._factory)
            loop = asyncio.get_running_loop()
            wakeup = asyncio.Event()
            sub._inbox.add_waker(lambda: loop.call_soon_threadsafe(wakeup.set))
            self._sub, self._wakeup = sub, wakeup
        return self

    async def close(self) -> None:
        """Stop and clean up, like :meth:`Subscription.close`."""
        if self._sub is not None:
            await asyncio.to_thread(self._sub.close)

    async def __aenter__(self) -> AsyncSubscription:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sub = self._sub
        if sub is not None and exc_type is None and not sub.closed:
            sub._settle_pending()
        if sub is not None:
            sub._pending = None
        await self.close()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Any:
        out = await self.receive(None)
        if out is None:
            raise StopAsyncIteration
        return out

    async def receive(self, timeout: float | None = None) -> Any:
        """The next event (a list when batching); None on timeout or once closed."""
        await self.open()
        sub = self.subscription
        sub._settle_pending()
        batch = await self._next_batch(timeout)
        if batch is None:
            return None
        sub._pending = batch
        return sub._shape(batch)

    async def _next_batch(self, timeout: float | None) -> _Batch | None:
        sub = self.subscription
        wakeup = self._wakeup
        assert wakeup is not None
        col = _Collector(sub)
        end = None if timeout is None else time.monotonic() + timeout
        inbox = sub._inbox
        while col.room > 0:
            wakeup.clear()  # before looking, so a put after the look still wakes us
            got = inbox.take(col.room, 0)
            if got:
                col.add(got)
                continue
            if inbox.closed:
                break
            if col.deadline is not None:
                wait: float | None = col.deadline - time.monotonic()
            else:
                wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                await asyncio.wait_for(wakeup.wait(), wait)
            except asyncio.TimeoutError:
                continue  # the loop looks once more, then stops on the expired wait
        return col.batch()

    async def run(self) -> None:
        """Handle events until closed; an ``async def`` handler is awaited."""
        await self.open()
        sub = self.subscription
        if sub._options.handler is None:
            raise TypeError("run() needs a handler: subscribe_async(..., handler=...)")
        try:
            while not sub._stopping.is_set():
                batch = await self._next_batch(None)
                if batch is None:
                    if sub._inbox.closed:
                        return
                    continue
                await self._handle(batch)
        except BramaError:
            await asyncio.to_thread(sub._hub.release, sub, force=True)
            raise

    async def _invoke(self, batch: _Batch) -> None:
        sub = self.subscription
        one, many = sub._call_one, sub._call_many
        if sub._options.batch_size == 1 and one is not None:
            await _maybe_await(one(batch.items[0].event))
        elif many is not None:
            await _maybe_await(many(batch.events))
        else:
            assert one is not None
            for it in batch.items:
                await _maybe_await(one(it.event))

    async def _handle(self, batch: _Batch) -> None:
        sub = self.subscription
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._invoke(batch)
            except Exception as exc:
                sub._counts["errors"] += 1
                if sub._stopping.is_set():
                    return
                if attempt >= sub._options.max_deliveries:
                    await asyncio.to_thread(sub._give_up, batch, exc, attempt)
                    return
                delay = sub._retry_delay(attempt)
                log.warning("handler failed (attempt %d of %d), retrying in %.2f s: %r",
                            attempt, sub._options.max_deliveries, delay, exc)
                sub._counts["retries"] += 1
                await asyncio.sleep(delay)
                continue
            sub._finish(batch)
            return


async def _maybe_await(result: object) -> None:
    if inspect.isawaitable(result):
        await result
