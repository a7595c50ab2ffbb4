"""The owner's lease (brama_mq.owner.lease), driven with made-up monotonic times."""

from __future__ import annotations

import pytest

from brama_mq.owner.lease import DEFAULT_LEASE_S, Lease, default_lease


@pytest.mark.parametrize(
    ("heartbeat", "lease"),
    [
        (10.0, 5.0),  # the worker's default: half a heartbeat
        (4.0, 2.0),  # the cluster tests'
        (1.0, 1.0),  # never under a second
        (0.0, DEFAULT_LEASE_S),  # heartbeats off: a fixed lease
    ],
)
def test_default_lease_is_half_a_heartbeat(heartbeat: float, lease: float) -> None:
    """The broker drops a silent connection after about a heartbeat, so the lease runs
    out well before anyone else can be given the queue."""
    assert default_lease(heartbeat) == lease


# (steps, expired at the end?) where a step is ("sent", mark, t), ("confirmed", mark)
# or ("grant", t); the lease is 2 s, made at t=0, and checked at t=10.
CASES = [
    ("nothing ever confirmed", [], True),
    ("a probe sent at 9 and confirmed proves t=9", [("sent", 1, 9.0), ("confirmed", 1)], False),
    ("a probe sent at 9 never confirmed", [("sent", 1, 9.0)], True),
    ("the proof is the send time, not the confirm's arrival",
     [("sent", 1, 7.0), ("confirmed", 1)], True),
    ("a confirm covers every earlier probe",
     [("sent", 1, 5.0), ("sent", 2, 9.0), ("confirmed", 2)], False),
    ("a confirm of an older mark does not prove the newer probe",
     [("sent", 1, 5.0), ("sent", 2, 9.0), ("confirmed", 1)], True),
    ("a grant (takeover record came back) counts", [("grant", 8.5)], False),
    ("a grant drops older unconfirmed probes",
     [("sent", 1, 1.0), ("grant", 8.5), ("confirmed", 1)], False),
]


@pytest.mark.parametrize(("steps", "expired"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lease_is_proven_by_confirmed_probes(steps: list[tuple], expired: bool) -> None:
    """Only a confirm of a publish sent less than a lease ago keeps the owner acting."""
    lease = Lease(2.0, 0.0)
    for step in steps:
        if step[0] == "sent":
            lease.sent(step[1], step[2])
        elif step[0] == "confirmed":
            lease.confirmed(step[1])
        else:
            lease.grant(step[1])
    assert lease.expired(10.0) is expired


def test_renewal_is_due_after_a_quarter_lease_without_a_confirmed_publish() -> None:
    """An idle owner probes four times per lease; a busy one (every batch is a
    confirmed journal record) never needs to."""
    lease = Lease(2.0, 0.0)
    assert not lease.renewal_due(0.4)
    assert lease.renewal_due(0.5)
    lease.sent(1, 0.5)
    assert not lease.renewal_due(0.9)
    lease.sent(1, 0.9)  # the same mark again: nothing new went out, not a new probe
    assert lease.renewal_due(1.0)


def test_lease_must_be_positive() -> None:
    """A zero or negative lease is refused, naming the value."""
    with pytest.raises(ValueError, match="lease must be > 0"):
        Lease(0.0, 0.0)
