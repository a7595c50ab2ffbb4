"""Per-connection breaker policy: defaults, validation, partial updates.

Policies are immutable and interned, so 100k connections registered with the same
options share one object (that is most of why an idle connection costs < 1 KB). The
operating mode and the options of one outcome report are checked here too: they are
validated like policy options but kept on the connection, or not kept at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from brama_mq.errors import PolicyError

CONSECUTIVE: Final = "consecutive"
FAILURE_RATE: Final = "failure_rate"
FIXED: Final = "fixed"
EXPONENTIAL: Final = "exponential"
#: Window types of the failure-rate strategy: the last N calls, or the last N seconds.
COUNT: Final = "count"
TIME: Final = "time"

# Operating modes (``configure``/``register`` option ``mode``; kept on the connection).
NORMAL: Final = "normal"
DISABLED: Final = "disabled"  # every call allowed, outcomes recorded, no transitions
FORCED_OPEN: Final = "forced_open"  # every call refused, no expiry, until the mode changes
METRICS_ONLY: Final = "metrics_only"  # outcomes and events as usual, never opens
MODES: Final = (NORMAL, DISABLED, FORCED_OPEN, METRICS_ONLY)

#: Largest ``min_reporters``, and how many distinct reporters a connection remembers per
#: kind of failure (see core/window.py): a quorum up to this size is decided exactly.
MAX_REPORTERS: Final = 64
#: Longest ``reporter`` name of an outcome report.
MAX_REPORTER_CHARS: Final = 200
#: Longest time window.
MAX_WINDOW_SECONDS: Final = 3600

_DAY_MS: Final = 24 * 60 * 60 * 1000
#: Largest millisecond value accepted anywhere (about 292 years): keeps deadlines finite.
MAX_MS: Final = 2**53

# Brama's own spellings, accepted so an Elixir user's options carry over.
_BACKOFF_ALIASES: Final = {"progressive": EXPONENTIAL, "exponential": EXPONENTIAL, FIXED: FIXED}


@dataclass(frozen=True, slots=True)
class Policy:
    """How one connection's breaker counts failures and how long it stays open."""

    strategy: str = CONSECUTIVE
    max_attempts: int = 5
    expiry_ms: int = 60_000
    backoff: str = FIXED
    backoff_factor: float = 2.0
    max_expiry_ms: int | None = None  # None: ten times expiry_ms, as Brama does
    half_open_permits: int = 1
    success_threshold: int = 1
    probe_timeout_ms: int = 30_000
    inactive_ms: int | None = _DAY_MS  # None: never clean up
    window_size: int = 100
    minimum_calls: int | None = None  # None: window_size
    failure_rate_threshold: float = 50.0
    slow_call_ms: int | None = None  # None: no call counts as slow
    slow_call_rate_threshold: float = 100.0
    window_type: str = COUNT
    window_seconds: int = 60
    min_reporters: int = 1

    @property
    def effective_max_expiry_ms(self) -> int:
        return self.expiry_ms * 10 if self.max_expiry_ms is None else self.max_expiry_ms

    @property
    def effective_minimum_calls(self) -> int:
        return self.window_size if self.minimum_calls is None else self.minimum_calls

    def open_period_ms(self, reopen_level: int) -> int:
        """Open time after ``reopen_level`` consecutive re-opens from half-open."""
        if self.backoff == FIXED or reopen_level <= 0:
            return self.expiry_ms
        cap = self.effective_max_expiry_ms
        try:
            grown = self.expiry_ms * self.backoff_factor**reopen_level
        except OverflowError:  # thousands of reopens: far past any cap
            return cap
        return cap if grown >= cap else int(grown)

    def to_options(self) -> dict[str, Any]:
        # Every field is an immutable scalar: no need for asdict()'s deep copy (4x dearer).
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def updated(self, options: Mapping[str, Any]) -> Policy:
        """A copy with ``options`` applied; every other field is kept. Validates the result."""
        changes: dict[str, Any] = {}
        for name, value in options.items():
            if name == "metadata" or name == "mode":
                continue  # kept on the connection, not in the shared policy
            check = _CHECKS.get(name)
            if check is None:
                raise PolicyError(name, value, f"unknown option; valid: {', '.join(OPTION_NAMES)}")
            changes[name] = check(name, value)
        policy = replace(self, **changes) if changes else self
        policy._check_consistency()
        return intern_policy(policy)

    def _check_consistency(self) -> None:
        if self.max_expiry_ms is not None and self.max_expiry_ms < self.expiry_ms:
            raise PolicyError(
                "max_expiry_ms", self.max_expiry_ms, f"must be >= expiry_ms ({self.expiry_ms})"
            )
        if (
            self.minimum_calls is not None
            and self.window_type == COUNT
            and self.minimum_calls > self.window_size
        ):  # a time window holds any number of calls
            raise PolicyError(
                "minimum_calls", self.minimum_calls, f"must be <= window_size ({self.window_size})"
            )


_FIELD_NAMES: Final = tuple(f.name for f in fields(Policy))


def _int_in(low: int, high: int = MAX_MS) -> Any:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(name, value, "must be an integer")
        if not low <= value <= high:
            raise PolicyError(name, value, f"must be between {low} and {high}")
        return value

    return check


def _optional(inner: Any) -> Any:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def _float_in(low: float, high: float, *, low_open: bool = False) -> Any:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(name, value, "must be a number")
        number = float(value)
        too_low = number <= low if low_open else number < low
        if math.isnan(number) or too_low or number > high:
            bound = f"> {low}" if low_open else f">= {low}"
            raise PolicyError(name, value, f"must be {bound} and <= {high}")
        return number

    return check


def _choice(choices: Mapping[str, str]) -> Any:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise PolicyError(name, value, f"must be one of {', '.join(sorted(set(choices)))}")
        return choices[value]

    return check


_CHECKS: Final[dict[str, Any]] = {
    "strategy": _choice({CONSECUTIVE: CONSECUTIVE, FAILURE_RATE: FAILURE_RATE}),
    "max_attempts": _int_in(1, 1_000_000),
    "expiry_ms": _int_in(1),
    "backoff": _choice(_BACKOFF_ALIASES),
    "backoff_factor": _float_in(1.0, 1000.0),
    "max_expiry_ms": _optional(_int_in(1)),
    "half_open_permits": _int_in(1, 1_000_000),
    "success_threshold": _int_in(1, 1_000_000),
    "probe_timeout_ms": _int_in(1),
    "inactive_ms": _optional(_int_in(1)),
    "window_size": _int_in(1, 100_000),
    "minimum_calls": _optional(_int_in(1, 100_000)),
    "failure_rate_threshold": _float_in(0.0, 100.0, low_open=True),
    "slow_call_ms": _optional(_int_in(1)),
    "slow_call_rate_threshold": _float_in(0.0, 100.0, low_open=True),
    "window_type": _choice({COUNT: COUNT, TIME: TIME}),
    "window_seconds": _int_in(1, MAX_WINDOW_SECONDS),
    "min_reporters": _int_in(1, MAX_REPORTERS),
}

#: Option names accepted by register/configure (``metadata`` and ``mode`` are kept on the
#: connection; ``configure`` of the defaults refuses ``mode``).
OPTION_NAMES: Final[tuple[str, ...]] = (*_CHECKS, "metadata", "mode")

_INTERNED: dict[Policy, Policy] = {}


def intern_policy(policy: Policy) -> Policy:
    """Share one object per distinct policy (bounded: policies are few in practice)."""
    found = _INTERNED.get(policy)
    if found is not None:
        return found
    if len(_INTERNED) < 10_000:
        _INTERNED[policy] = policy
    return policy


def check_mode(value: Any) -> str:
    """The mode named by ``value`` (the interned constant), or PolicyError naming ``mode``."""
    if isinstance(value, str) and value in MODES:
        return MODES[MODES.index(value)]
    raise PolicyError("mode", _shown(value), f"must be one of {', '.join(MODES)}")


def check_duration(value: Any) -> float | int:
    """``duration_ms`` of an outcome: a finite number >= 0 (ms), at most MAX_MS."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError("duration_ms", _shown(value), "must be a number >= 0")
    if not 0 <= value <= MAX_MS:  # NaN fails both comparisons
        raise PolicyError("duration_ms", _shown(value), f"must be between 0 and {MAX_MS}")
    return value


def check_reporter(value: Any) -> str:
    """``reporter`` of an outcome: a non-empty name of at most MAX_REPORTER_CHARS."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REPORTER_CHARS:
        raise PolicyError(
            "reporter",
            _shown(value),
            f"must be a non-empty string of at most {MAX_REPORTER_CHARS} characters",
        )
    return value


def _shown(value: Any) -> Any:
    """``value`` itself, or its repr cut short: an error reason lands in a header."""
    text = repr(value)
    return value if len(text) <= 60 else _Cut(text[:57] + "...")


class _Cut(str):
    """A repr already shortened: shown as it is, without another layer of quotes."""

    def __repr__(self) -> str:
        return str(self)


def check_metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PolicyError("metadata", value, "must be a JSON object with string keys")
    return value or None


DEFAULT_POLICY: Final = intern_policy(Policy())
