"""brama_mq.core stays sans-I/O: no broker libraries imported, no clock read, no sleep."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import brama_mq.core

CORE_DIR = Path(brama_mq.core.__file__).parent
CORE_FILES = sorted(CORE_DIR.rglob("*.py"))

#: Modules core must never pull in (broker clients, task queues, wire-model libraries,
#: event loops and socket-level libraries). ``threading`` is not listed: ``logging`` needs it.
FORBIDDEN = (
    "kombu",
    "amqp",
    "celery",
    "vine",
    "billiard",
    "pika",
    "aio_pika",
    "aiormq",
    "pamqp",
    "pydantic",
    "redis",
    "asyncio",
    "socket",
    "ssl",
    "selectors",
)

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

_PROBE = """
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
import brama_mq
package = sorted(set(sys.modules) - before)
import brama_mq.core
names = ["brama_mq.core"]
for info in pkgutil.walk_packages(brama_mq.core.__path__, "brama_mq.core."):
    importlib.import_module(info.name)
    names.append(info.name)
new = sorted(set(sys.modules) - before)
print(json.dumps({"imported": names, "new": new, "package": package}))
"""


def test_core_has_modules() -> None:
    """The scans below see the engine, policy and events modules (guards an empty glob)."""
    names = {p.stem for p in CORE_FILES}
    assert {"__init__", "engine", "policy", "events"} <= names


def test_importing_core_loads_no_broker_or_io_library() -> None:
    """A fresh interpreter importing brama_mq.core and every submodule loads none of FORBIDDEN."""
    root = str(CORE_DIR.parent.parent)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, root],
        capture_output=True,
        text=True,
        check=False,
        cwd=root,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected = {"brama_mq.core"} | {
        info.name for info in pkgutil.walk_packages(brama_mq.core.__path__, "brama_mq.core.")
    }
    assert set(report["imported"]) == expected
    loaded = [
        mod
        for mod in report["new"]
        if any(mod == bad or mod.startswith(bad + ".") for bad in FORBIDDEN)
    ]
    by_package = [mod for mod in loaded if mod in report["package"]]
    assert loaded == [], f"importing brama_mq.core pulled in {loaded}" + (
        f" ({by_package} already by brama_mq/__init__.py)" if by_package else ""
    )
    outside = [
        mod
        for mod in report["new"]
        if mod.startswith("brama_mq.")
        and mod not in report["package"]
        and mod != "brama_mq.errors"
        and not mod.startswith("brama_mq.core")
    ]
    assert outside == [], f"brama_mq.core imports other layers: {outside}"


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


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


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_no_forbidden_imports_in_source(path: Path) -> None:
    """No core module imports a broker, I/O or wire-model library, even lazily."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = sorted(
        name
        for name in _imports(tree)
        if any(name == mod or name.startswith(mod + ".") for mod in FORBIDDEN)
    )
    assert bad == []


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
