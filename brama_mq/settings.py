"""Settings shared by the worker, clients and the CLI (docs/protocol.md, "Settings").

Environment variables are part of the contract; flags override them.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from brama_mq.core.policy import check_reporter
from brama_mq.errors import BramaError, PolicyError

DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
#: The embedded, in-process transport (no broker): what the demo runs on.
MEMORY_URL: Final = "memory://"
DEFAULT_PREFIX: Final = "brama"

_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_LOG_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")
#: URL schemes that reach RabbitMQ (kombu's names for py-amqp), and the embedded one.
_AMQP_SCHEMES: Final = ("amqp", "amqps", "pyamqp")


class SettingsError(BramaError, ValueError):
    """A setting with a bad value; names the setting and where it came from."""


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``**`` (failover lists included): the one
    way brama_mq writes a broker URL into logs, errors and CLI output."""
    parts = []
    for one in url.split(";"):
        try:
            split = urlsplit(one)
            netloc = split.netloc
        except ValueError:
            parts.append("<unparsable url>")
            continue
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                one = one.replace(netloc, f"{user}:**@{host}", 1)
        parts.append(one)
    return ";".join(parts)


def passwords_in(url: str) -> list[str]:
    """The passwords in ``url`` (raw and percent-decoded), to scrub from messages."""
    found: list[str] = []
    for one in url.split(";"):
        try:
            password = urlsplit(one).password
        except ValueError:
            continue
        if password:
            found.extend({password, unquote(password)})
    return found


def check_broker_url(url: str) -> None:
    """Refuse a URL brama_mq cannot speak to, naming it, before anything connects (a
    ``redis://`` URL would otherwise end deep in kombu with an AttributeError)."""
    if url.strip().lower().startswith(MEMORY_URL):
        return
    for one in url.split(";"):
        scheme = one.strip().split("://", 1)[0].lower() if "://" in one else ""
        if scheme not in _AMQP_SCHEMES:
            shown = mask_url(one.strip()) or "an empty URL"
            raise SettingsError(
                f"broker URL {shown!r} is not an AMQP URL: brama_mq talks AMQP 0-9-1 to "
                "RabbitMQ (amqp://user:password@host:5672/vhost or amqps://..., failover "
                f"URLs separated by ';'), or runs embedded with {MEMORY_URL}"
            )


@dataclass(frozen=True, slots=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    prefetch: int = 500
    log_level: str = "INFO"
    max_command_bytes: int = 65_536
    #: TLS (any of these, or an ``amqps://`` URL, turns it on): CA bundle to verify the
    #: broker with, client certificate and key (for brokers that ask for one), and whether
    #: to verify the broker's certificate and host name at all.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    #: Commands a client keeps while the broker has not confirmed them (buffered while
    #: it is away); beyond that a command raises OutboxFullError.
    client_buffer: int = 10_000
    #: AMQP heartbeat in seconds (0: off). A connection to a frozen or cut-off node is
    #: noticed after about two of them, and the owner's lease is half of one
    #: (docs/operations.md, "Running on a cluster").
    heartbeat: float = 10.0
    #: Who this process's outcome reports say they come from (``options.reporter``, for a
    #: policy's ``min_reporters``); None: ``<host>:<pid>``, computed in each process.
    reporter: str | None = None

    def __post_init__(self) -> None:
        check_broker_url(self.broker_url)
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
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise SettingsError(f"{name} {path!r} is not a readable file")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise SettingsError("tls_key_file is set but tls_cert_file is not")
        if (
            isinstance(self.heartbeat, bool)
            or not isinstance(self.heartbeat, (int, float))
            or not 0 <= self.heartbeat <= 3600
        ):
            raise SettingsError(
                f"heartbeat must be a number of seconds from 0 (off) to 3600, "
                f"got {self.heartbeat!r}"
            )
        if not isinstance(self.tls_verify, bool):
            raise SettingsError(f"tls_verify must be true or false, got {self.tls_verify!r}")
        if self.reporter is not None:
            try:
                check_reporter(self.reporter)
            except PolicyError as exc:
                raise SettingsError(f"reporter {exc.value!r} {exc.problem}") from None

    @property
    def tls(self) -> bool:
        """Whether connections use TLS: an ``amqps://`` URL or any TLS option."""
        urls = [u.strip().lower() for u in self.broker_url.split(";")]
        return any(u.startswith("amqps://") for u in urls) or any(
            (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        ) or not self.tls_verify

    def ssl_options(self) -> dict[str, Any] | None:
        """kombu's ``ssl=`` (py-amqp's socket-wrapping options), or None without TLS.

        Verification on means the certificate chain (against ``tls_ca_file``, else the
        system's CAs) *and* the host name; off means neither (for tests and private CAs
        you cannot distribute: the connection is encrypted but not authenticated).
        """
        if not self.tls:
            return None
        opts: dict[str, Any] = {
            "cert_reqs": ssl.CERT_REQUIRED if self.tls_verify else ssl.CERT_NONE,
        }
        if self.tls_verify:
            opts["server_hostname"] = None  # kombu fills in the host being connected to
        if self.tls_ca_file is not None:
            opts["ca_certs"] = self.tls_ca_file
        if self.tls_cert_file is not None:
            opts["certfile"] = self.tls_cert_file
        if self.tls_key_file is not None:
            opts["keyfile"] = self.tls_key_file
        return opts

    def transport_options(self) -> dict[str, Any]:
        """Keyword arguments for ``open_transport`` beyond the URL and topology."""
        out: dict[str, Any] = {"heartbeat": self.heartbeat}
        opts = self.ssl_options()
        if opts is not None:
            out["ssl"] = opts
        return out

    def __repr__(self) -> str:
        # Written by hand so the password never reaches a log line or a traceback.
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["broker_url"] = mask_url(self.broker_url)
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"

    @property
    def safe_broker_url(self) -> str:
        return mask_url(self.broker_url)

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
            ("tls_ca_file", "BRAMA_TLS_CA_FILE", str),
            ("tls_cert_file", "BRAMA_TLS_CERT_FILE", str),
            ("tls_key_file", "BRAMA_TLS_KEY_FILE", str),
            ("tls_verify", "BRAMA_TLS_VERIFY", _flag),
            ("client_buffer", "BRAMA_CLIENT_BUFFER", int),
            ("heartbeat", "BRAMA_HEARTBEAT", float),
            ("reporter", "BRAMA_REPORTER", str),
        ):
            raw = env.get(var)
            if raw is None or raw == "" or overrides.get(field) is not None:
                continue
            try:
                values[field] = kind(raw)
            except ValueError:
                what = "boolean (true/false)" if kind is _flag else f"valid {kind.__name__}"
                raise SettingsError(f"{var}={raw!r} is not a {what}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _flag(raw: str) -> bool:
    """An environment variable's boolean: 1/true/yes/on or 0/false/no/off."""
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(raw)
