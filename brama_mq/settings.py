"""Settings shared by the worker, clients and the CLI (ARCHITECTURE.md section 7).

Environment variables are part of the contract; flags override them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from brama_mq.errors import BramaError

DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
#: The embedded, in-process transport (no broker): what the demo runs on.
MEMORY_URL: Final = "memory://"
DEFAULT_PREFIX: Final = "brama"

_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_LOG_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_PASSWORD_RE: Final = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^/\s]*(?=@)")


class SettingsError(BramaError, ValueError):
    """A setting with a bad value; names the setting and where it came from."""


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and errors."""
    return _PASSWORD_RE.sub(r"\g<head>***", url)


@dataclass(frozen=True, slots=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    prefetch: int = 500
    log_level: str = "INFO"
    max_command_bytes: int = 65_536
    #: Commands a client keeps while the broker has not confirmed them (buffered while
    #: it is away); beyond that a command raises OutboxFullError.
    client_buffer: int = 10_000

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise SettingsError(
                f"prefix {self.prefix!r} must be 1-64 letters, digits, '_' or '-' "
                "(it becomes part of exchange and queue names)"
            )
        for name in ("shards", "prefetch", "max_command_bytes", "client_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be a positive integer, got {value!r}")
        if self.prefetch > 65_535:
            raise SettingsError(f"prefetch must be <= 65535, got {self.prefetch}")
        if not isinstance(self.log_level, str) or self.log_level.upper() not in _LOG_LEVELS:
            raise SettingsError(
                f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}"
            )

    @property
    def safe_broker_url(self) -> str:
        return redact_url(self.broker_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``BRAMA_*`` variables, then non-None ``overrides`` (flags) on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field, var, kind in (
            ("broker_url", "BRAMA_BROKER_URL", str),
            ("prefix", "BRAMA_PREFIX", str),
            ("shards", "BRAMA_SHARDS", int),
            ("prefetch", "BRAMA_PREFETCH", int),
            ("log_level", "BRAMA_LOG_LEVEL", str),
            ("max_command_bytes", "BRAMA_MAX_COMMAND_BYTES", int),
            ("client_buffer", "BRAMA_CLIENT_BUFFER", int),
        ):
            raw = env.get(var)
            if raw is None or raw == "" or overrides.get(field) is not None:
                continue
            try:
                values[field] = kind(raw)
            except ValueError:
                raise SettingsError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)
