"""The command line as a whole: every command, its --help examples, --json where it prints
data, shell completion that completes, status filters, and demo --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from brama_mq.cli import main
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Transport
from tests.worker_proc import ROOT

COMMANDS = ["worker", "demo", "watch", "status", "register", "unregister", "open", "close",
            "reset", "configure", "mode", "completion"]
PRINTS_DATA = ["demo", "watch", "status", "register", "unregister", "open", "close", "reset",
               "configure", "mode"]


def test_every_command_exists_with_examples_in_its_help() -> None:
    """Each command of the issue is there, and its --help shows `brama-mq <command>` examples."""
    assert set(COMMANDS) <= set(main.commands), sorted(main.commands)
    runner = CliRunner()
    for name in COMMANDS:
        out = runner.invoke(main, [name, "--help"])
        assert out.exit_code == 0, (name, out.output)
        assert "Examples:" in out.output, name
        assert f"brama-mq {name}" in out.output, name
        if name in PRINTS_DATA:
            assert "--json" in out.output, name


def test_top_level_help_documents_exit_codes() -> None:
    """`brama-mq --help` lists the exit codes scripts can rely on."""
    out = CliRunner().invoke(main, ["--help"]).output
    for line in ("0  ok", "1  the operation failed", "2  bad usage", "3  the connection is not",
                 "4  no owner answered"):
        assert line in out, line


def _complete(words: str) -> list[str]:
    env = {**os.environ, "_BRAMA_MQ_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    out = subprocess.run(
        [sys.executable, "-c", "from brama_mq.cli import main; main(prog_name='brama-mq')"],
        env=env, capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    return [line.split(",", 1)[1] for line in out.stdout.splitlines() if "," in line]


def test_shell_completion_script_and_completions() -> None:
    """`brama-mq completion bash` prints click's script; completion completes commands,
    options and choices."""
    for shell in ("bash", "zsh", "fish"):
        out = CliRunner().invoke(main, ["completion", shell])
        assert out.exit_code == 0 and "_BRAMA_MQ_COMPLETE" in out.output, shell
    assert "status" in _complete("brama-mq st")
    assert "--metrics-port" in _complete("brama-mq worker --me")
    assert set(_complete("brama-mq status --state ")) == {"closed", "open", "half_open"}
    bad = CliRunner().invoke(main, ["completion", "powershell"])
    assert bad.exit_code == 2


def test_demo_json_prints_what_it_saw() -> None:
    """`brama-mq demo --json` prints one JSON object (events, transitions, states) and
    nothing else on stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "brama_mq.cli", "demo", "--json", "--seconds", "4"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["events"]["state_change"] >= 1
    assert ["payment_api", "closed", "open"] in report["transitions"]
    assert set(report["states"]) >= {"payment_api", "ledger_db"}


@pytest.fixture
def owner(amqp_transport: Transport) -> Iterator[Owner]:
    amqp_transport.declare()
    running = run_owner(amqp_transport)
    yield running
    running.stop(wait=10)


@pytest.mark.broker
def test_status_table_filters_by_scope_and_state(
    owner: Owner, broker_url: str, prefix: str
) -> None:
    """status: a row per breaker with state, failures and time left open; --scope and
    --state filter it; an empty result says how to register one."""
    env = {**os.environ, "BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix,
           "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "brama_mq.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    assert "no breakers (register one" in cli("status").stdout
    for args in (["payment_api", "--scope", "payments", "-o", "expiry_ms=60000"],
                 ["ledger_db", "--scope", "ledger"], ["cache"]):
        assert cli("register", *args).returncode == 0
    assert cli("open", "payment_api", "--scope", "payments").returncode == 0
    table = cli("status").stdout
    assert "3 breakers" in table
    row = next(line for line in table.splitlines() if "payment_api" in line)
    assert "open" in row and " s" in row  # time left open, in seconds
    left = float(row.split(" s")[0].split()[-1].strip("│"))
    assert 50 < left <= 60
    only = cli("status", "--scope", "payments", "--json")
    assert [r["connection"] for r in json.loads(only.stdout)] == ["payment_api"]
    closed = json.loads(cli("status", "--state", "closed", "--json").stdout)
    assert sorted(r["connection"] for r in closed) == ["cache", "ledger_db"]
    assert "no breakers in scope 'nope'" in cli("status", "--scope", "nope").stdout


def test_errors_are_one_line_saying_what_to_check(tmp_path: object) -> None:
    """An unreachable broker: exit 1, one line on stderr naming what to check, no password;
    a bad flag value: exit 2 with click's usage error."""
    env = {**os.environ, "BRAMA_BROKER_URL": "amqp://guest:s3cret@127.0.0.1:1//"}
    out = subprocess.run([sys.executable, "-m", "brama_mq.cli", "status", "--timeout", "1"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brama-mq: ")
    assert "check --broker / BRAMA_BROKER_URL" in lines[0] and "s3cret" not in lines[0]
    bad = CliRunner().invoke(main, ["status", "--state", "sideways"])
    assert bad.exit_code == 2 and "sideways" in bad.output
