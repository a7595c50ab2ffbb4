"""brama_mq.core stays sans-I/O: no clock read, no sleep.

What core may import is import-linter's job (pyproject.toml, tests/test_layers.py); this
file scans for what an import rule cannot see: calls that read a clock or sleep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import brama_mq.core

CORE_DIR = Path(brama_mq.core.__file__).parent
CORE_FILES = sorted(CORE_DIR.rglob("*.py"))

#: Calls that read a clock or sleep: (module, attribute).
CLOCK_CALLS = {
    ("time", name)
    for name in (
        "time",
        "time_ns",
        "monotonic",
        "monotonic_ns",
        "perf_counter",
        "perf_counter_ns",
        "process_time",
        "sleep",
        "localtime",
        "gmtime",
        "ctime",
        "asctime",
        "strftime",
    )
} | {
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
    ("asyncio", "sleep"),
}

def test_core_has_modules() -> None:
    """The scans below see the engine, policy and events modules (guards an empty glob)."""
    names = {p.stem for p in CORE_FILES}
    assert {"__init__", "engine", "policy", "events"} <= names


def _dotted(node: ast.AST) -> list[str]:
    """['a', 'b', 'c'] for the expression a.b.c; [] for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return []


def _clock_calls(tree: ast.AST) -> list[str]:
    """Calls and from-imports of clock or sleep functions, as 'line: name'."""
    hits: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime", "asyncio"):
            for alias in node.names:
                if (node.module, alias.name) in CLOCK_CALLS:
                    hits.append(f"{node.lineno}: from {node.module} import {alias.name}")
        if isinstance(node, ast.Call):
            parts = _dotted(node.func)
            if len(parts) >= 2 and (parts[-2], parts[-1]) in CLOCK_CALLS:
                hits.append(f"{node.lineno}: {'.'.join(parts)}()")
    return hits


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_no_clock_reads_or_sleeps(path: Path) -> None:
    """No core module calls time.time/monotonic/sleep or datetime.now (static AST scan)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert _clock_calls(tree) == []


def test_scanner_catches_clock_calls() -> None:
    """The AST scan flags the calls it is meant to catch (a guard against a blind test)."""
    source = (
        "import time, datetime\n"
        "from time import monotonic\n"
        "time.time()\n"
        "time.sleep(1)\n"
        "datetime.datetime.now()\n"
        "datetime.date.today()\n"
        "now = 5\n"
    )
    hits = _clock_calls(ast.parse(source))
    assert len(hits) == 5, hits
