"""compose/: the docker-compose stack, checked without Docker (none on these machines).

The compose file is parsed; every service built from our Dockerfile must run a command
that exists (a console script of an installed distribution, or ``python -m`` of an
importable module, with options its parser accepts); Prometheus must scrape what the
services serve; the Grafana dashboard must ask for metrics brama_mq exports. Then the
same commands run as local processes against the local RabbitMQ, under this test's
prefix: two owners (one active), the registration, a prefork Celery worker and the
monitor; a failing payment service opens the circuit, the monitor alerts, and the
metrics endpoints say so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from brama_mq.cli import main as cli_main
from brama_mq.transport import Topology
from tests import brokers
from tests.metrics_helpers import free_port, scrape, value, wait_for
from tests.worker_proc import ROOT, LoggedProcess, worker_env

COMPOSE = ROOT / "compose"
COMPOSE_BROKER = "amqp://brama:brama@rabbitmq:5672//"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def built_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def test_compose_file_has_the_stack() -> None:
    """RabbitMQ with the management and prometheus plugins, two owners, a Celery worker
    running workers/celery_app.py, the monitor, and a Dockerfile that builds the package."""
    compose = load_compose()
    services = compose["services"]
    assert {"rabbitmq", "owner-a", "owner-b", "celery", "monitor"} <= set(services)
    rabbit = services["rabbitmq"]
    plugins_file = next(v.split(":")[0] for v in rabbit["volumes"] if "enabled_plugins" in v)
    plugins = (COMPOSE / plugins_file).read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    assert "management" in rabbit["image"]
    owners = [n for n, s in built_services(compose).items() if s["command"][:2] ==
              ["brama-mq", "worker"]]
    assert len(owners) == 2
    assert "workers.celery_app" in services["celery"]["command"]
    assert services["monitor"]["command"][:3] == ["python", "-m", "workers.monitor"]
    for svc in built_services(compose).values():
        build = svc["build"]
        dockerfile = (COMPOSE / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), dockerfile
        text = dockerfile.read_text()
        for needed in ("brama_mq", "workers", "pyproject.toml", "celery,metrics"):
            assert needed in text, needed


def check_entry_point(argv: Sequence[str]) -> None:
    """``argv[0]`` is a console script of an installed distribution (or ``python -m`` of
    an importable module) and accepts the rest of ``argv``."""
    head, rest = argv[0], list(argv[1:])
    if head == "python":
        assert rest[0] == "-m", argv
        module = rest[1]
        assert importlib.util.find_spec(module) is not None, f"{module} is not importable"
        source = Path(importlib.util.find_spec(module).origin or "").read_text()
        assert 'if __name__ == "__main__"' in source, f"{module} cannot run with -m"
        mod = __import__(module, fromlist=["main"])
        with pytest.raises(SystemExit) as exit_info:  # its parser accepts the options
            mod.main([*rest[2:], "--help"])
        assert exit_info.value.code == 0, argv
        return
    found = importlib.metadata.entry_points(group="console_scripts", name=head)
    assert found, f"{head} is no console script of an installed distribution"
    if head == "brama-mq":
        assert next(iter(found)).value == "brama_mq.cli:main"
        name, command, args = cli_main.resolve_command(
            cli_main.make_context(head, list(rest), resilient_parsing=True), list(rest)
        )
        assert command is not None, argv
        command.make_context(str(name), list(args))  # raises on an unknown option
        return
    if head == "celery":
        assert rest[:2] == ["-A", "workers.celery_app"]
        assert importlib.util.find_spec("workers.celery_app") is not None


def test_every_service_command_is_an_entry_point() -> None:
    """Every brama_mq service's command exists and parses; the Dockerfile's CMD too."""
    compose = load_compose()
    for name, svc in built_services(compose).items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: write the command as a list"
        check_entry_point(command)
    cmd = re.search(r"^CMD (\[.*\])$", (COMPOSE / "Dockerfile").read_text(), re.M)
    assert cmd is not None
    check_entry_point(json.loads(cmd.group(1)))


def metrics_port(svc: Mapping[str, Any]) -> int | None:
    command = svc.get("command", [])
    if "--metrics-port" in command:
        return int(command[command.index("--metrics-port") + 1])
    env = svc.get("environment") or {}
    return int(env["BRAMA_METRICS_PORT"]) if "BRAMA_METRICS_PORT" in env else None


def test_prometheus_scrapes_every_metrics_endpoint_and_the_dashboard_asks_for_ours() -> None:
    """Prometheus' targets are the services' metrics ports (and RabbitMQ's plugin port);
    every brama_* metric of the dashboard is one brama_mq exports."""
    compose = load_compose()
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    serving = {f"{name}:{port}" for name, svc in compose["services"].items()
               if (port := metrics_port(svc)) is not None}
    assert serving and serving <= targets, (serving, targets)
    assert "rabbitmq:15692" in targets
    for target in targets:
        assert target.split(":")[0] in compose["services"], target
    dashboard = json.loads((COMPOSE / "grafana/dashboards/brama.json").read_text())
    exported = {"brama_circuit_state", "brama_failure_count", "brama_events_total",
                "brama_commands_total", "brama_dead_letters_total",
                "brama_confirm_latency_seconds_bucket", "brama_owner_active",
                "brama_guard_checks_total", "brama_circuitbreaker_calls_total",
                "brama_circuitbreaker_failure_rate", "brama_circuitbreaker_slow_call_rate",
                "brama_circuitbreaker_calls_seconds_bucket", "brama_circuit_mode"}
    asked = {m for p in dashboard["panels"] for t in p["targets"]
             for m in re.findall(r"brama_[a-z_]+", t["expr"])}
    assert asked == exported, asked ^ exported
    # RabbitMQ's own panels, and the scope / connection variables every breaker panel
    # filters by.
    assert any("rabbitmq_" in t["expr"] for p in dashboard["panels"] for t in p["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"scope", "connection"}
    for p in dashboard["panels"]:
        for t in p["targets"]:
            for series in re.findall(r"(brama_[a-z_]+)(\{[^}]*\})?", t["expr"]):
                if series[0] in ("brama_circuit_state", "brama_failure_count", "brama_circuit_mode",
                                 "brama_guard_checks_total", "brama_circuitbreaker_calls_total"):
                    assert '$scope' in series[1] and '$connection' in series[1], t["expr"]


def test_every_long_running_brama_service_has_a_healthcheck() -> None:
    """Owners, the Celery worker and the monitor each have a healthcheck that runs a
    Python one-liner (run for real in test_the_stack_runs_as_local_processes); the image
    context has a .dockerignore that keeps tests, docs and caches out."""
    compose = load_compose()
    for name, svc in built_services(compose).items():
        if svc.get("restart") == "on-failure":  # one-shot setup: exits when done
            continue
        check = svc.get("healthcheck")
        assert check and check["test"][:3] == ["CMD", "python", "-c"], name
        compile(check["test"][3], f"{name} healthcheck", "exec")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests", "docs", "**/__pycache__"} <= set(ignored)
    for needed in ("pyproject.toml", "README.md", "brama_mq", "workers"):
        assert needed not in ignored


class Service(LoggedProcess):
    """One compose service's command as a local process (own process group, one log)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str],
                 log_dir: Path) -> None:
        self.name = self.label = name
        super().__init__(log_dir / f"{name}.log", local_argv(argv), env, new_session=True)

    def close(self) -> None:
        self.close_group(15)


def local_argv(argv: Sequence[str]) -> list[str]:
    """The container's command, run from this checkout with this Python."""
    head, rest = argv[0], list(argv[1:])
    if head == "brama-mq":
        return [sys.executable, "-m", "brama_mq.cli", *rest]
    if head == "celery":
        return [sys.executable, "-m", "celery", *rest]
    assert head == "python", argv
    return [sys.executable, *rest]


def local_env(svc: Mapping[str, Any], replace: Mapping[str, str],
              extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
    env = {k: replace.get(v, v) for k, v in env.items()}
    return worker_env({**env, **extra})


@pytest.mark.broker
def test_the_stack_runs_as_local_processes(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> None:
    """The compose services' own commands, run locally: one owner active, the other
    standby; setup registers payment_api; a failing service opens the circuit through
    the prefork Celery worker; the monitor alerts; the metrics endpoints show it."""
    compose = load_compose()
    services = built_services(compose)
    topology = Topology(prefix)
    queue = f"{prefix}-payments"
    broker_registry.track(prefix, broker_url, queues=[
        queue, topology.subscription_queue("ops-alerts"),
        topology.subscription_dead_queue("ops-alerts"), *topology.queue_names(),
    ], exchanges=[queue, *(name for name, _ in topology.exchanges())])
    replace = {COMPOSE_BROKER: broker_url, "brama": prefix}
    common = {"PAYMENTS_QUEUE": queue, "PAYMENT_SERVICE_DIR": str(tmp_path / "service")}
    ports = {name: free_port() for name in services}
    running: dict[str, Service] = {}

    def start(name: str) -> Service:
        svc = services[name]
        argv = list(svc["command"])
        extra = dict(common)
        if "--metrics-port" in argv:  # one host: every endpoint needs a port of its own
            argv[argv.index("--metrics-port") + 1] = str(ports[name])
        if "--health-file" in argv:
            argv[argv.index("--health-file") + 1] = str(tmp_path / f"{name}.alive")
        if "BRAMA_METRICS_PORT" in (svc.get("environment") or {}):
            extra["BRAMA_METRICS_PORT"] = str(ports[name])
            extra["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / f"prom-{name}")
        running[name] = Service(name, argv, local_env(svc, replace, extra), tmp_path)
        return running[name]

    def tool(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "workers.celery_app", *args], cwd=ROOT, timeout=60,
            env=local_env(services["celery"], replace, common), capture_output=True, text=True,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        start("owner-a").wait_for_log("owner serving")
        start("owner-b").wait_for_log("owner serving")
        setup = start("setup")
        assert setup.proc.wait(60) == 0, setup.output()
        start("celery").wait_for_log(" ready.", timeout=60)
        running["celery"].wait_for_log("bootstrapped: 1 connections", timeout=30, count=2)
        start("monitor").wait_for_log("monitor watching")

        tool("fail", "1.0")
        tool("charge", "5")
        running["monitor"].wait_for_log("ALERT circuit opened for payments/payment_api",
                                         timeout=30)
        assert json.loads(tool("status"))["state"] == "open"

        def owners() -> list[Any]:
            return [scrape(ports["owner-a"]), scrape(ports["owner-b"])]

        pair = wait_for(owners, lambda p: sum(value(s, "brama_owner_active") or 0
                                              for s in p) == 1, 20, "one active owner")
        active = next(s for s in pair if value(s, "brama_owner_active") == 1.0)
        assert value(active, "brama_circuit_state", scope="payments",
                     connection="payment_api", state="open") == 1.0
        # a task checked just before the state change reached its process also ran
        assert (value(active, "brama_commands_total", op="failure", result="applied")
                or 0) >= 3
        guard = scrape(ports["celery"])
        assert (value(guard, "brama_guard_checks_total", scope="payments",
                      connection="payment_api", result="closed") or 0) >= 3
        # Each service's own healthcheck, pointed at this host's port and file.
        for name, service in running.items():
            check = services[name].get("healthcheck")
            if check is None or not service.alive():
                continue
            code = check["test"][3]
            for port in ("9464", "9466"):
                code = code.replace(f":{port}/", f":{ports[name]}/")
            code = code.replace("/tmp/monitor.alive", str(tmp_path / f"{name}.alive"))
            done = subprocess.run([sys.executable, "-c", code], timeout=30,
                                  capture_output=True, text=True)
            assert done.returncode == 0, (name, code, done.stderr)
    finally:
        for service in reversed(list(running.values())):
            service.close()


@pytest.fixture(autouse=True)
def _no_leftover_env() -> Iterator[None]:
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == before
