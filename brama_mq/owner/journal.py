"""The owner's journal: every input that changed the engine, in order, per batch.

The engine is deterministic: the same calls with the same ``now`` give the same state,
events, ``seq`` and ids. So instead of shipping state, the active owner ships its
*inputs* (decoded commands, ``advance`` times, probe grants) to a RabbitMQ stream; a
standby replays them into its own engine and stays an exact replica, and a restarted
deployment rebuilds from the last snapshot plus the entries after it.

An entry is a small JSON array; a batch is one message:
``{"v": 1, "lineage": str, "n": batch number, "entries": [...]}`` with entries
``["a", now]`` (advance), ``["c", now, command]`` (apply; the command as a JSON object),
``["p", now, scope, connection]`` (acquire_probe) and ``["r", scope, connection, lease]``
(release_probe).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from brama_mq.core.engine import Command, Engine

JOURNAL_VERSION: Final = 1


@dataclass(slots=True)
class JournalBatch:
    """The inputs of one owner batch, in the order the engine saw them."""

    lineage: str
    n: int
    entries: list[list[Any]] = field(default_factory=list)

    def advance(self, now: int) -> None:
        self.entries.append(["a", now])

    def command(self, now: int, command: Mapping[str, Any]) -> None:
        self.entries.append(["c", now, command])

    def probe(self, now: int, scope: str | None, connection: str) -> None:
        self.entries.append(["p", now, scope, connection])

    def release(self, scope: str | None, connection: str, lease: str) -> None:
        self.entries.append(["r", scope, connection, lease])

    def encode(self) -> bytes:
        doc = {"v": JOURNAL_VERSION, "lineage": self.lineage, "n": self.n, "entries": self.entries}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, body: bytes | str) -> JournalBatch:
        doc = json.loads(body)
        if doc.get("v") != JOURNAL_VERSION:
            raise ValueError(f"unsupported journal version {doc.get('v')!r}")
        return cls(doc["lineage"], int(doc["n"]), list(doc["entries"]))


class AppliedIds:
    """Ids of recently applied commands, so a command redelivered after a takeover is
    recognised and not applied twice. Bounded: only the last unacked window matters."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, command_id: str) -> None:
        ids = self._ids
        ids[command_id] = None
        if len(ids) > self.limit:
            ids.popitem(last=False)

    def dump(self) -> list[str]:
        return list(self._ids)

    def load(self, ids: Iterable[str]) -> None:
        for command_id in ids:
            self.add(command_id)


def replay(engine: Engine, batch: JournalBatch, applied: AppliedIds | None = None) -> None:
    """Apply one journal batch to a replica engine (its events are dropped: the owner
    that wrote the batch already published them)."""
    for entry in batch.entries:
        kind = entry[0]
        if kind == "a":
            engine.advance(entry[1])
        elif kind == "c":
            doc = entry[2]
            engine.apply(
                Command(
                    doc["op"],
                    doc.get("connection"),
                    doc.get("scope"),
                    doc.get("reason"),
                    doc.get("options") or {},
                ),
                entry[1],
            )
            if applied is not None and isinstance(doc.get("id"), str):
                applied.add(doc["id"])
        elif kind == "p":
            if (entry[2], entry[3]) in engine:
                engine.acquire_probe(entry[2], entry[3], entry[1])
        elif kind == "r":
            engine.release_probe(entry[1], entry[2], entry[3])
        else:
            raise ValueError(f"unknown journal entry kind {kind!r}")
