"""Nothing changed meaning: commands without the new fields behave as before slow calls,
time windows, reporters and modes, and a snapshot written before them restores.

The expectations were recorded once from the engine as it was before (commit 6fc22a4):
a digest of everything a long seeded script made it say, and one of its snapshots. The
new engine's output is compared after removing only what is new (``failure_rate`` and
``slow_call_rate`` in outcome events, ``mode`` and rates in status rows, the new policy
options and snapshot fields) and reading the new machine word ``reason: failure_rate``
back as the sentence it replaced (now in ``detail``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any

import pytest

from brama_mq.core import APPLIED, Command, Engine

#: Option names the engine did not have before (dropped from ``policy``/``defaults``).
NEW_OPTIONS = frozenset(
    {"slow_call_ms", "slow_call_rate_threshold", "window_type", "window_seconds", "min_reporters"}
)
NEW_STATUS = frozenset({"mode", "failure_rate", "slow_call_rate"})
NEW_CONN_FIELDS = frozenset({"window_pos", "buckets", "reporters", "mode"})

REGISTER: dict[tuple[str | None, str], dict[str, Any]] = {
    ("s", "a"): {"max_attempts": 3, "expiry_ms": 1_000},
    ("s", "b"): {"strategy": "failure_rate", "window_size": 5, "minimum_calls": 3,
                 "failure_rate_threshold": 50.0, "expiry_ms": 700, "backoff": "exponential"},
    (None, "c"): {"half_open_permits": 2, "success_threshold": 2, "max_attempts": 2,
                  "expiry_ms": 400, "inactive_ms": 20_000, "probe_timeout_ms": 300},
}
CONFIGURE = [{"max_attempts": 2}, {"expiry_ms": 900}, {"failure_rate_threshold": 40.0},
             {"window_size": 4, "minimum_calls": 2}, {"inactive_ms": 5_000},
             {"metadata": {"k": 1}}]


def legacy_script(engine: Engine, seed: int, steps: int, now: int = 1_000) -> list[Any]:
    """Drive ``engine`` with a seeded mix of every op, advances and probes, using only
    what the engine understood before: everything it said, step by step."""
    rng = random.Random(seed)
    keys = list(REGISTER)
    leases: dict[tuple[str | None, str], list[str]] = {k: [] for k in keys}
    seen: list[Any] = []
    for key in keys:
        if key not in engine:
            result = engine.apply(Command("register", key[1], key[0], options=REGISTER[key]), now)
            seen.append(("cmd", result.status, [e.to_dict() for e in result.events]))
    for _ in range(steps):
        now += rng.choice([0, 1, 7, 50, 120, 333, 700])
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.1:
            seen.append(("adv", [e.to_dict() for e in engine.advance(now).events]))
            continue
        if roll < 0.18:
            if key in engine:
                probe = engine.acquire_probe(key[0], key[1], now)
                if probe.lease:
                    leases[key].append(probe.lease)
                seen.append(("probe", probe.to_dict()))
            continue
        options: dict[str, Any] = {}
        reason = None
        if key not in engine and rng.random() < 0.5:  # removed: register again, mostly
            roll = 1.0
        if roll < 0.5:
            op = "failure"
            reason = rng.choice([None, "timeout", "boom"])
        elif roll < 0.8:
            op = "success"
            if rng.random() < 0.2:
                options["count"] = rng.randint(2, 4)
        elif roll < 0.85:
            op = "open"
            choice = rng.choice(["absent", None, 250])
            if choice != "absent":
                options["expiry_ms"] = choice
        elif roll < 0.9:
            op = rng.choice(["close", "reset"])
        elif roll < 0.95:
            op = "configure"
            options = dict(rng.choice(CONFIGURE))
        else:
            op = "register" if roll == 1.0 else rng.choice(["unregister", "register"])
            if op == "register":
                options = dict(REGISTER[key])
        if op in ("success", "failure") and leases[key] and rng.random() < 0.7:
            options["lease"] = leases[key].pop(0)
        result = engine.apply(Command(op, key[1], key[0], reason, options), now)
        seen.append(("cmd", result.status, [e.to_dict() for e in result.events]))
    seen.append(("status", engine.statuses(now=now)))
    seen.append(("snapshot", engine.snapshot()))
    return seen


def _old_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in NEW_OPTIONS}


def _old_data(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in ("failure_rate", "slow_call_rate")}
    if out.get("reason") == "failure_rate":
        out["reason"] = out.pop("detail")
    if isinstance(out.get("policy"), dict):
        out["policy"] = _old_options(out["policy"])
    return out


def _old_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(snap)
    out["defaults"] = _old_options(out["defaults"])
    for conn in out["connections"]:
        for name in NEW_CONN_FIELDS:
            conn.pop(name, None)
        conn["policy"] = _old_options(conn["policy"])
        if conn["window"] is not None:
            conn["window"] = [bool(x) for x in conn["window"]]
    return out


def as_before(seen: list[Any]) -> list[Any]:
    """What the engine said, in the vocabulary of the engine before the new features."""
    out: list[Any] = []
    for item in seen:
        kind = item[0]
        if kind == "cmd":
            out.append(("cmd", item[1], [{**e, "data": _old_data(e["data"])} for e in item[2]]))
        elif kind == "adv":
            out.append(("adv", [{**e, "data": _old_data(e["data"])} for e in item[1]]))
        elif kind == "status":
            rows = [{k: v for k, v in row.items() if k not in NEW_STATUS} for row in item[1]]
            for row in rows:
                row["policy"] = _old_options(row["policy"])
            out.append(("status", rows))
        elif kind == "snapshot":
            out.append(("snapshot", _old_snapshot(item[1])))
        else:
            out.append(item)
    return out


def digest(seen: list[Any]) -> str:
    text = json.dumps(seen, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: ``digest(legacy_script(Engine(lineage="compat"), seed, 600))`` of the engine before.
RECORDED = {
    1: "0e6204fdc94820d319c17668cc28e1eaca3db53c6ce67179d2870524d6692071",
    2: "895358ede2c01e4abba13164eda278b643e6c014f83ddacc752ef4b4133f7b39",
    3: "7d44b674526d82b7264d16b70e9aaaee240e6da426ac8f047b9b0d23bc16916e",
}
#: A snapshot the engine before took: ``busy_engine()`` of tests/test_engine_rules.py (every
#: state, a held open, a failure-rate window, a removal), then ``legacy_script(e, 17, 25,
#: now=1_100)``.
OLD_SNAPSHOT: dict[str, Any] = json.loads(
    r"""
{"v":1,"lineage":"snap","defaults":{"strategy":"consecutive","max_attempts":5,"expiry_ms":60000,
"backoff":"fixed","backoff_factor":2.0,"max_expiry_ms":null,"half_open_permits":1,
"success_threshold":1,"probe_timeout_ms":30000,"inactive_ms":20000,"window_size":100,
"minimum_calls":null,"failure_rate_threshold":50.0},"connections":[{"state":"closed",
"failure_count":1,"probe_successes":0,"reopen_level":0,"opened_at":null,"open_until":null,"held"
:false,"registered_at":0,"last_activity":1,"last_success":null,"last_failure":1,"metadata":{
"team":"x"},"seq":3,"timer_gen":0,"id_base":"6c99f5d60132d39b","scope":"svc","connection":
"closed","policy":{"strategy":"consecutive","max_attempts":5,"expiry_ms":60000,"backoff":"fixed"
,"backoff_factor":2.0,"max_expiry_ms":null,"half_open_permits":1,"success_threshold":1,
"probe_timeout_ms":30000,"inactive_ms":20000,"window_size":100,"minimum_calls":null,
"failure_rate_threshold":50.0},"leases":{},"window":null},{"state":"half_open","failure_count":1
,"probe_successes":0,"reopen_level":0,"opened_at":2,"open_until":null,"held":false,
"registered_at":0,"last_activity":4592,"last_success":null,"last_failure":2,"metadata":null,
"seq":8,"timer_gen":2,"id_base":"1cdc5509e46edc84","scope":"svc","connection":"open","policy":{
"strategy":"consecutive","max_attempts":1,"expiry_ms":4000,"backoff":"fixed","backoff_factor":
2.0,"max_expiry_ms":null,"half_open_permits":1,"success_threshold":1,"probe_timeout_ms":30000,
"inactive_ms":20000,"window_size":100,"minimum_calls":null,"failure_rate_threshold":50.0},
"leases":{},"window":null},{"state":"open","failure_count":0,"probe_successes":0,"reopen_level":
0,"opened_at":3,"open_until":null,"held":true,"registered_at":0,"last_activity":3,"last_success"
:null,"last_failure":null,"metadata":null,"seq":4,"timer_gen":1,"id_base":"75d9afe333f376f1",
"scope":null,"connection":"held","policy":{"strategy":"consecutive","max_attempts":5,"expiry_ms"
:60000,"backoff":"fixed","backoff_factor":2.0,"max_expiry_ms":null,"half_open_permits":1,
"success_threshold":1,"probe_timeout_ms":30000,"inactive_ms":20000,"window_size":100,
"minimum_calls":null,"failure_rate_threshold":50.0},"leases":{},"window":null},{"state":
"half_open","failure_count":1,"probe_successes":1,"reopen_level":0,"opened_at":4,"open_until":
null,"held":false,"registered_at":0,"last_activity":1030,"last_success":1030,"last_failure":4,
"metadata":null,"seq":9,"timer_gen":2,"id_base":"4a45198bfc11a063","scope":"svc","connection":
"half","policy":{"strategy":"consecutive","max_attempts":1,"expiry_ms":1000,"backoff":"fixed",
"backoff_factor":2.0,"max_expiry_ms":null,"half_open_permits":3,"success_threshold":3,
"probe_timeout_ms":500,"inactive_ms":20000,"window_size":100,"minimum_calls":null,
"failure_rate_threshold":50.0},"leases":{},"window":null},{"state":"closed","failure_count":2,
"probe_successes":0,"reopen_level":0,"opened_at":null,"open_until":null,"held":false,
"registered_at":0,"last_activity":8,"last_success":8,"last_failure":7,"metadata":null,"seq":6,
"timer_gen":0,"id_base":"90c2d1de7ce3bab9","scope":"svc","connection":"rate","policy":{
"strategy":"failure_rate","max_attempts":5,"expiry_ms":60000,"backoff":"fixed","backoff_factor":
2.0,"max_expiry_ms":null,"half_open_permits":1,"success_threshold":1,"probe_timeout_ms":30000,
"inactive_ms":20000,"window_size":10,"minimum_calls":4,"failure_rate_threshold":60.0},"leases":
{},"window":[true,false,true,false]},{"state":"half_open","failure_count":2,"probe_successes":0,
"reopen_level":1,"opened_at":1007,"open_until":null,"held":false,"registered_at":0,
"last_activity":4592,"last_success":null,"last_failure":1007,"metadata":null,"seq":14,
"timer_gen":4,"id_base":"2635d143591bc0a5","scope":"svc","connection":"expo","policy":{
"strategy":"consecutive","max_attempts":1,"expiry_ms":1000,"backoff":"exponential",
"backoff_factor":2.0,"max_expiry_ms":50000,"half_open_permits":1,"success_threshold":1,
"probe_timeout_ms":30000,"inactive_ms":20000,"window_size":100,"minimum_calls":null,
"failure_rate_threshold":50.0},"leases":{},"window":null},{"state":"closed","failure_count":1,
"probe_successes":0,"reopen_level":0,"opened_at":null,"open_until":null,"held":false,
"registered_at":1100,"last_activity":5306,"last_success":4472,"last_failure":5306,"metadata":
null,"seq":7,"timer_gen":0,"id_base":"98926e1a4213ec76","scope":"s","connection":"a","policy":{
"strategy":"consecutive","max_attempts":3,"expiry_ms":1000,"backoff":"fixed","backoff_factor":
2.0,"max_expiry_ms":null,"half_open_permits":1,"success_threshold":1,"probe_timeout_ms":30000,
"inactive_ms":20000,"window_size":100,"minimum_calls":null,"failure_rate_threshold":50.0},
"leases":{},"window":null},{"state":"open","failure_count":4,"probe_successes":0,"reopen_level":
0,"opened_at":3764,"open_until":null,"held":true,"registered_at":1100,"last_activity":6459,
"last_success":3431,"last_failure":6459,"metadata":null,"seq":14,"timer_gen":3,"id_base":
"6d583ea1b464e47b","scope":"s","connection":"b","policy":{"strategy":"failure_rate",
"max_attempts":5,"expiry_ms":700,"backoff":"exponential","backoff_factor":2.0,"max_expiry_ms":
null,"half_open_permits":1,"success_threshold":1,"probe_timeout_ms":30000,"inactive_ms":20000,
"window_size":5,"minimum_calls":3,"failure_rate_threshold":50.0},"leases":{},"window":[]},{
"state":"closed","failure_count":1,"probe_successes":0,"reopen_level":0,"opened_at":null,
"open_until":null,"held":false,"registered_at":1100,"last_activity":5299,"last_success":5292,
"last_failure":5299,"metadata":null,"seq":7,"timer_gen":0,"id_base":"260408a50355d07d","scope":
null,"connection":"c","policy":{"strategy":"consecutive","max_attempts":2,"expiry_ms":400,
"backoff":"fixed","backoff_factor":2.0,"max_expiry_ms":null,"half_open_permits":2,
"success_threshold":2,"probe_timeout_ms":300,"inactive_ms":20000,"window_size":4,"minimum_calls"
:2,"failure_rate_threshold":50.0},"leases":{},"window":null}],"removed_seq":[["svc","gone",4]],
"next_lease":3,"epoch":0}
"""
)
#: ``digest(legacy_script(<OLD_SNAPSHOT restored>, 10, 300, now=20_000))`` before.
RECORDED_AFTER_RESTORE = "925f59b887ae5b7a934d20472d431a30d4c44c73fefe1cadc32250e5983f0852"


@pytest.mark.parametrize("seed", sorted(RECORDED))
def test_commands_without_new_fields_mean_what_they_meant(seed: int) -> None:
    """A long script of every op (no new field in it) makes the engine say exactly what
    the engine before said, once the new additions are taken out again."""
    seen = legacy_script(Engine(lineage="compat"), seed, 600)
    assert digest(as_before(seen)) == RECORDED[seed]


def test_a_snapshot_of_the_engine_before_restores_and_goes_on_the_same() -> None:
    """A snapshot written before windows of slow calls, reporters and modes restores
    (missing fields: defaults) and the restored engine carries on as the old one did."""
    engine = Engine.restore(json.loads(json.dumps(OLD_SNAPSHOT)))
    rows = engine.statuses()
    assert rows and {row["mode"] for row in rows} == {"normal"}
    assert all(row["policy"]["min_reporters"] == 1 for row in rows)
    seen = legacy_script(engine, 10, 300, now=20_000)
    assert digest(as_before(seen)) == RECORDED_AFTER_RESTORE
    # and what it writes now restores to itself
    snap = engine.snapshot()
    assert Engine.restore(json.loads(json.dumps(snap))).snapshot() == snap


def test_old_snapshot_windows_read_as_plain_outcomes() -> None:
    """A count window written as true/false reads as failures/successes, not slow."""
    snap = json.loads(json.dumps(OLD_SNAPSHOT))
    windows = [c for c in snap["connections"] if c["window"] is not None]
    assert windows and all(isinstance(x, bool) for c in windows for x in c["window"])
    engine = Engine.restore(snap)
    for c in windows:
        status = engine.status(c["scope"], c["connection"])
        calls = len(c["window"])
        if c["state"] == "closed" and calls:
            assert status["failure_count"] == sum(c["window"])
            assert status["failure_rate"] == round(100.0 * sum(c["window"]) / calls, 2)
        assert status["slow_call_rate"] is None


def test_script_is_applied_mostly() -> None:
    """The recorded script is not trivially refused: most of its commands apply."""
    seen = legacy_script(Engine(lineage="compat"), 1, 600)
    statuses = [item[1] for item in seen if item[0] == "cmd"]
    assert statuses.count(APPLIED) > 0.7 * len(statuses)
