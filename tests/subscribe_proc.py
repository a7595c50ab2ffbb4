"""A subscriber in a process of its own, for tests that kill, stop or multiply subscribers.

``python -m tests.subscribe_proc --url URL --prefix P --out FILE [options]`` subscribes
(named when ``--name`` is given, else transient) and appends one line per handled event
to FILE: ``handled <pid> <scope> <connection> <seq> <event>``, flushed before the handler
returns (so a SIGKILL right after leaves the line on disk). Prints ``ready`` once bound.
``--hang-on-seq N`` writes ``entered <pid> <seq>`` and then blocks forever in the handler
(the test SIGKILLs it there); with ``--batch-size B`` (> 1) the handler takes batches and
hangs on the batch holding seq N, writing ``entered <pid> <seqs...>``. ``--stats FILE``
rewrites the subscription's counters as JSON every 0.1 s. SIGTERM closes the
subscription and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import brama_mq
from brama_mq.protocol import Event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name")
    parser.add_argument("--connection", action="append")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=10_000)
    parser.add_argument("--queue-length", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hang-on-seq", type=int)
    parser.add_argument("--stats")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)

    out = open(args.out, "a", buffering=1)  # noqa: SIM115 (closed at exit)
    pid = os.getpid()

    def handle(event: Event) -> None:
        if args.hang_on_seq is not None and event.seq == args.hang_on_seq:
            out.write(f"entered {pid} {event.seq}\n")
            out.flush()
            while True:
                time.sleep(3600)
        if args.delay:
            time.sleep(args.delay)
        out.write(f"handled {pid} {event.scope} {event.connection} {event.seq} {event.event}\n")
        out.flush()

    def handle_batch(events: list[Event]) -> None:
        """The whole batch is acknowledged after this returns: hang before writing any."""
        if args.hang_on_seq is not None and any(e.seq == args.hang_on_seq for e in events):
            out.write(f"entered {pid} {' '.join(str(e.seq) for e in events)}\n")
            out.flush()
            while True:
                time.sleep(3600)
        for event in events:
            out.write(f"handled {pid} {event.scope} {event.connection} {event.seq} "
                      f"{event.event}\n")
        out.flush()

    sub = brama_mq.subscribe(
        connection=args.connection,
        name=args.name,
        handler=handle_batch if args.batch_size > 1 else handle,
        batch_size=args.batch_size,
        batch_timeout=0.2,
        prefetch=args.prefetch,
        max_length=args.max_length,
        queue_length=args.queue_length,
        broker_url=args.url,
        prefix=args.prefix,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sub.start()
    print("ready", flush=True)

    def write_stats() -> None:
        stats: dict[str, Any] = sub.stats()
        tmp = f"{args.stats}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, args.stats)

    while not stop.wait(0.1):
        if args.stats:
            write_stats()
    sub.close()
    if args.stats:
        write_stats()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
