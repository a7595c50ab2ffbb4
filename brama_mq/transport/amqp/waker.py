"""A socket pair that ends a select() waiting in another thread.

The client link's I/O thread and the event source's get() both wait in select() on the
broker socket; a thread that has new work (a command to send, a close, a consumer's
wake()) needs a file descriptor to make that select() return. One class serves both, so
the coalescing and the close are written once.
"""

import contextlib
import socket
import threading


class Waker:
    """At most one byte in flight: wake() after wake() before clear() sends nothing.

    Use it level-triggered: change the shared state, then wake(); the waiting side calls
    clear() and then looks at the state, so a wake() that arrives between the two is
    never lost (the state it signals is already visible).
    """

    __slots__ = ("_lock", "_pending", "_r", "_w")

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()
        self._pending = False

    @property
    def socket(self) -> socket.socket:
        """The end to put in select()'s read list."""
        return self._r

    def wake(self) -> None:
        """Make the waiting select() return (thread-safe)."""
        with self._lock:
            if self._pending:
                return
            self._pending = True
        with contextlib.suppress(OSError):  # closed: nobody waits any more
            self._w.send(b"\0")

    def clear(self) -> None:
        """Read the pending byte; the next wake() sends again."""
        # Read first, then reset the flag: a wake() in between finds it still set and
        # sends nothing, which is fine because the caller looks at the state next.
        with contextlib.suppress(OSError):
            while self._r.recv(64):
                pass
        with self._lock:
            self._pending = False

    def close(self) -> None:
        for sock in (self._r, self._w):
            with contextlib.suppress(OSError):
                sock.close()
