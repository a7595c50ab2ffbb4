"""Flags every ``brama-mq`` command that connects shares: TLS and the shard count.

They are written into this process's ``BRAMA_*`` environment (flags override the
environment, as everywhere), because the components the commands build (the client, the
subscription hub) read their settings from it; a command runs in a process of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: flag -> (environment variable, help)
_TLS_FLAGS: dict[str, tuple[str, str]] = {
    "--tls-ca-file": ("BRAMA_TLS_CA_FILE", "CA bundle to verify the broker with"),
    "--tls-cert-file": ("BRAMA_TLS_CERT_FILE", "client certificate (PEM)"),
    "--tls-key-file": ("BRAMA_TLS_KEY_FILE", "client certificate's private key (PEM)"),
}


def _to_env(var: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(_ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            os.environ[var] = "true" if value else "false"
        else:
            os.environ[var] = str(value)

    return store


def tls_options(func: F) -> F:
    """``--tls-ca-file``, ``--tls-cert-file``, ``--tls-key-file``, ``--[no-]tls-verify``."""
    func = click.option(
        "--tls-verify/--no-tls-verify",
        default=None,
        expose_value=False,
        callback=_to_env("BRAMA_TLS_VERIFY"),
        help="Verify the broker's certificate and host name [env BRAMA_TLS_VERIFY; default on].",
    )(func)
    for flag, (var, text) in reversed(_TLS_FLAGS.items()):
        func = click.option(
            flag,
            default=None,
            expose_value=False,
            callback=_to_env(var),
            type=click.Path(dir_okay=False),
            help=f"TLS: {text} [env {var}].",
        )(func)
    return func


def shards_option(func: F) -> F:
    """``--shards N``: must equal the count the broker holds (else the command refuses)."""
    return click.option(
        "--shards",
        type=int,
        default=None,
        expose_value=False,
        callback=_to_env("BRAMA_SHARDS"),
        help="Number of owner shards [env BRAMA_SHARDS; default 1].",
    )(func)
