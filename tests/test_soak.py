"""The 60-second soak (``python -m bench soak``): mixed load while the active owner is
SIGKILLed every 15 s and a fresh standby started. Pins that no critical event is lost
across takeovers (every event a local replay of the same commands produces reaches a
durable queue; duplicates share ``id`` and ``seq``), that no takeover invents events a
correct owner would not publish (state and ``seq`` survive), and that the active owner's
memory does not grow beyond 10% after warm-up."""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = pytest.mark.broker


def test_soak_60_seconds_with_owner_kills(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRAMA_BENCH_BROKER_URL", broker_url)
    result = soak.run(["--seconds", "60", "--kill-every", "15", "--rate", "600"])
    counts = result["counts"]
    print(result)
    assert counts["kills"] >= 3
    assert result["lost_events"] == 0, result
    assert counts["unexpected_events"] == 0, result
    assert counts["duplicates_share_id"], result
    assert counts["critical_received"] >= counts["critical_expected"] > 0
    assert result["memory_growth_ratio"] <= 1.10, result
    assert result["commands_per_s"] > 0
