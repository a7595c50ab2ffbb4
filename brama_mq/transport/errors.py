"""Mapping of kombu / py-amqp / socket errors onto brama_mq's own error classes.

Every error that leaves the transport is a :class:`~brama_mq.errors.TransportError`
(or a subclass) with the original kept as ``__cause__``. Messages name the broker by
its masked URL, and any password that slipped into a library's message is scrubbed.
"""

from __future__ import annotations

import socket
import ssl

import amqp.exceptions as amqp_exc

from brama_mq.errors import (
    AccessRefusedError,
    BrokerStartingError,
    BrokerUnavailableError,
    ConfirmError,
    TransportError,
)
from brama_mq.settings import mask_url, passwords_in

__all__ = [
    "FATAL_ERRORS",
    "RECOVERABLE_ERRORS",
    "BrokerUnavailableError",
    "ConfirmError",
    "TransportError",
    "describe",
    "is_fatal",
    "map_error",
    "mask_url",
    "passwords_in",
]

#: Errors after which a new connection can help (the broker went away, a channel was
#: closed under us, a consumer was cancelled because its queue vanished...).
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # socket errors, refused, reset, timeouts (socket.timeout is an OSError)
    amqp_exc.AMQPError,  # connection- and channel-level protocol errors
    EOFError,
)

#: Errors a reconnect cannot fix: wrong credentials, missing vhost, a queue that exists
#: with other arguments. They are raised at once instead of retried.
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    amqp_exc.AccessRefused,
    amqp_exc.NotAllowed,
    amqp_exc.InvalidPath,
    amqp_exc.PreconditionFailed,
    # The broker's certificate was not accepted: reconnecting presents the same one.
    ssl.SSLCertVerificationError,
)


def is_fatal(exc: BaseException) -> bool:
    """Whether retrying after ``exc`` is pointless."""
    return isinstance(exc, FATAL_ERRORS)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "**")
    return text


def describe(exc: BaseException, url: str) -> str:
    """``"Type: message"`` of ``exc`` with any password of ``url`` scrubbed (for logs)."""
    return _scrub(f"{type(exc).__name__}: {exc}", passwords_in(url))


def map_error(
    exc: BaseException,
    what: str,
    url: str,
    *,
    kind: type[TransportError] | None = None,
) -> TransportError:
    """The brama_mq error for ``exc`` raised while doing ``what`` against ``url``.

    Connection-level failures become BrokerUnavailableError; refused credentials,
    channel errors and the rest TransportError; ``kind`` forces a class. The caller
    raises the result ``from exc``.
    """
    if isinstance(exc, TransportError):
        return exc
    detail = describe(exc, url)
    where = mask_url(url)
    if kind is None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            kind = TransportError
            detail += (" (TLS: the broker's certificate was not accepted; set "
                       "BRAMA_TLS_CA_FILE / --tls-ca-file to the CA that signed it and connect "
                       "by a host name the certificate names, or turn verification off with "
                       "BRAMA_TLS_VERIFY=false for a test broker)")
        elif isinstance(exc, amqp_exc.AccessRefused) and "login" not in str(exc).lower():
            # A channel-level refusal: logged in, but the user's permissions (configure,
            # write, read regexes) do not cover this exchange or queue.
            kind = AccessRefusedError
            detail += (" (this user's permissions do not allow it; see the permission "
                       "layout in docs/operations.md)")
        elif isinstance(exc, amqp_exc.AccessRefused | amqp_exc.NotAllowed | amqp_exc.InvalidPath):
            kind = TransportError
            detail += " (check the user, password and virtual host)"
        elif isinstance(exc, OSError | EOFError | amqp_exc.ConnectionError | socket.timeout):
            kind = BrokerUnavailableError
        elif isinstance(exc, amqp_exc.NotFound) and "down or inaccessible" in str(exc):
            # A durable queue or stream whose home node is still starting (or gone):
            # the broker is not fully there yet, which a retry cures.
            kind = BrokerStartingError
            if "home node" in str(exc):
                # A restarting node says this briefly of any durable queue; a classic
                # queue says it for as long as its one node is down (a quorum queue or
                # stream elects a new leader instead), so name the lasting cause too.
                detail += (" (waiting for that node; if it stays down and this is a "
                           "classic queue an earlier brama_mq version made, it is lost "
                           "with that node: migrate it to a quorum queue, "
                           "docs/operations.md 'Migrating classic queues')")
        else:
            kind = TransportError
    return kind(f"{what} failed ({where}): {detail}")
