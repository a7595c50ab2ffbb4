"""Every code example in README.md, executed.

* Each ```python block runs, in README order, in a fresh interpreter against a real
  ``brama-mq worker`` on the test broker under this test's prefix (examples that name the
  broker URL get the test broker's), and must exit 0; some outputs are checked.
* Each ``brama-mq`` line of a ```sh block is parsed by the real command line (the
  command and its options exist) and run: admin commands against the owner, ``watch``
  for one second, ``demo`` for three; ``worker`` is what the test runs as the owner.
  Lines for Docker, pip and pytest are not run here (``tests/test_compose.py`` runs the
  compose stack's commands as local processes).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from brama_mq.cli import main as cli_main
from brama_mq.transport import Topology
from tests import brokers
from tests.worker_proc import ROOT, WorkerProcess, worker_env

README = ROOT / "README.md"
README_URL = "amqp://guest:guest@127.0.0.1:5672//"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def cli_lines() -> list[list[str]]:
    """``brama-mq`` invocations of the sh blocks, without pipes, comments and env prefixes."""
    out = []
    for block in code_blocks("sh"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split(" | ")[0], comments=True)
                while words and "=" in words[0]:  # VAR=value prefixes
                    words = words[1:]
                if words and words[0] == "brama-mq":
                    out.append(words[1:])
    return out


def test_every_cli_line_of_the_readme_parses() -> None:
    """Each `brama-mq ...` line names a real command with options it accepts."""
    lines = cli_lines()
    assert {line[0] for line in lines} >= {"demo", "register", "open", "status", "close",
                                           "configure", "watch"}
    for args in lines:
        ctx = cli_main.make_context("brama-mq", list(args), resilient_parsing=True)
        name, command, rest = cli_main.resolve_command(ctx, list(args))
        assert command is not None, args
        command.make_context(str(name), list(rest))  # raises on a bad option


def test_architecture_svg_is_generated_from_its_source() -> None:
    """docs/architecture.svg is exactly what docs/architecture_svg.py writes, valid SVG,
    and the README shows it."""
    import runpy
    import xml.etree.ElementTree as ET

    module = runpy.run_path(str(ROOT / "docs" / "architecture_svg.py"), run_name="svg")
    committed = (ROOT / "docs" / "architecture.svg").read_text()
    assert module["draw"]() == committed, "run python docs/architecture_svg.py"
    assert ET.fromstring(committed).tag == "{http://www.w3.org/2000/svg}svg"
    assert "](docs/architecture.svg)" in README.read_text()


def test_readme_event_table_lists_every_event() -> None:
    """The README's event table has a row for every event type, critical ones marked."""
    from brama_mq.core.events import CRITICAL_EVENTS, EVENT_TYPES

    rows = dict(re.findall(r"^\| `([a-z_]+)` \| .*? \| (yes)? ?\|$", README.read_text(), re.M))
    assert set(rows) == set(EVENT_TYPES)
    assert {name for name, critical in rows.items() if critical} == set(CRITICAL_EVENTS)


@pytest.mark.broker
def test_readme_examples_run(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> None:
    """Every Python example and every brama-mq line of the README runs and succeeds."""
    topology = Topology(prefix)
    broker_registry.track(prefix, broker_url, queues=[
        *topology.queue_names(),
        *(q for name in ("billing-alerts", "audit")
          for q in (topology.subscription_queue(name), topology.subscription_dead_queue(name))),
    ], exchanges=[name for name, _ in topology.exchanges()])
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    owner = WorkerProcess(tmp_path / "owner.log", settings)
    try:
        owner.wait_ready()
        outputs = []
        for i, code in enumerate(code_blocks("python")):
            path = tmp_path / f"example_{i}.py"
            path.write_text(code.replace(README_URL, broker_url))
            out = subprocess.run([sys.executable, str(path)], env=worker_env(settings),
                                 cwd=tmp_path, capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, f"README example {i}:\n{code}\n{out.stderr}"
            outputs.append(out.stdout)
        text = "".join(outputs)
        assert "failure payments payment_api" in text  # the subscription example's event
        assert "ALERT circuit opened for payment_api: maintenance" in text
        assert "payment_api closed -> open" in text
        assert ("['registration', 'connection_registered', 'failure', 'circuit_opened', "
                "'state_change']") in text

        for args in cli_lines():
            if args[0] == "worker":
                continue  # the owner this test runs is `brama-mq worker`
            if args[0] == "watch":
                args = [*args, "--seconds", "1", "--plain"]
            if args[0] == "demo":
                args = [*args, "--seconds", "3", "--plain"]
            out = subprocess.run([sys.executable, "-m", "brama_mq.cli", *args],
                                 env=worker_env(settings), cwd=ROOT, capture_output=True,
                                 text=True, timeout=90)
            assert out.returncode == 0, f"brama-mq {shlex.join(args)}:\n{out.stderr}"
    finally:
        owner.terminate()
        try:
            owner.wait(15)
        finally:
            owner.close()
