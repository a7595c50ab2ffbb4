"""Helpers for metrics tests: a free port and a Prometheus scrape, parsed."""

from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout: float = 20.0) -> Samples:
    """GET /metrics (retrying until it answers): ``{(sample name, sorted labels): value}``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(samples_of, predicate, timeout: float = 15.0, what: str = "metrics"):  # type: ignore[no-untyped-def]
    """Scrape until ``predicate(samples)`` holds; the last samples on failure."""
    deadline = time.monotonic() + timeout
    while True:
        samples = samples_of()
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout} s: {samples}")
        time.sleep(0.2)
