"""``brama-mq dashboard`` in a real process, looked at in a real headless Chromium.

The owner runs in this process on the test broker; the dashboard is ``python -m
brama_mq.cli dashboard`` on a free port; the browser is Debian's ``chromium`` driven by
Playwright (its own browser downloads are not used). No Chromium is a failure, not a
skip: the message says how to install it (``.ci/run`` does).

The first test saves a screenshot under its tmp dir; with ``BRAMA_UPDATE_SCREENSHOT=1``
it also writes docs/images/dashboard.png, the one README.md shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from brama_mq.client.brama import Brama
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Transport
from tests.metrics_helpers import free_port
from tests.worker_proc import ROOT, LoggedProcess, run_cli, worker_env

pytestmark = pytest.mark.broker

SCREENSHOT = ROOT / "docs" / "images" / "dashboard.png"
TOKEN = "test-token-0123456789abcdef"
INSTALL_CHROMIUM = (
    "no Chromium found for the dashboard's browser test: install Debian's package "
    "(`apt-get install -y chromium`; .ci/run does) or set BRAMA_TEST_CHROMIUM to a "
    "Chromium or Chrome binary"
)


def chromium_path() -> str:
    """BRAMA_TEST_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    wanted = os.environ.get("BRAMA_TEST_CHROMIUM")
    if wanted:
        if shutil.which(wanted) is None:
            pytest.fail(f"BRAMA_TEST_CHROMIUM={wanted!r} is not an executable. "
                        + INSTALL_CHROMIUM, pytrace=False)
        return wanted
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(INSTALL_CHROMIUM, pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (Playwright driving the system's binary)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    path = chromium_path()
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=path, headless=True)
        yield instance
        instance.close()


class Page:
    """A fresh browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 640})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    p = Page(browser)
    yield p
    p.context.close()


@pytest.fixture
def owner(amqp_transport: Transport) -> Iterator[Owner]:
    amqp_transport.declare()
    running = run_owner(amqp_transport)
    yield running
    running.stop(wait=10)


@pytest.fixture
def client(owner: Owner, amqp_transport: Transport) -> Iterator[Brama]:
    c = Brama(transport=amqp_transport, request_timeout=10)
    yield c
    c.disconnect()


class DashboardProcess(LoggedProcess):
    """``brama-mq dashboard ARGS`` as a subprocess (``--port`` added unless in ARGS)."""

    label = "dashboard"

    def __init__(self, log_path: Path, settings: dict[str, str], args: Sequence[str]) -> None:
        args = list(args)
        if "--port" in args:
            self.port = int(args[args.index("--port") + 1])
        else:
            self.port = free_port()
            args += ["--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}/"
        argv = [sys.executable, "-m", "brama_mq.cli", "dashboard", *args]
        super().__init__(log_path, argv, worker_env(settings), new_session=True)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _body = http(self.url + "healthz")
                if status == 200:
                    return
            except OSError:
                pass
            if not self.alive():
                raise AssertionError(f"dashboard exited ({self.proc.returncode}):\n"
                                     + self.output())
            if time.monotonic() > deadline:
                raise AssertionError(f"dashboard not healthy within {timeout} s:\n"
                                     + self.output())
            time.sleep(0.05)


@pytest.fixture
def dashboard(broker_url: str, prefix: str, owner: Owner,
              tmp_path: Path) -> Iterator[Callable[..., DashboardProcess]]:
    """Start a dashboard (extra CLI args); stopped with SIGTERM at teardown."""
    started: list[DashboardProcess] = []

    def start(*args: str) -> DashboardProcess:
        settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
        proc = DashboardProcess(tmp_path / f"dashboard{len(started)}.log", settings, args)
        started.append(proc)
        proc.wait_healthy()
        return proc

    yield start
    for proc in started:
        proc.close_group(15)
        assert proc.proc.returncode == 0, proc.output()


def http(url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """GET (or POST JSON ``body``): the status and the decoded JSON answer."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def row_selector(connection: str, scope: str | None) -> str:
    return f'tr.breaker[data-connection="{connection}"][data-scope="{scope or ""}"]'


def seconds_left(page: Any, selector: str) -> float:
    text = page.locator(f"{selector} td.left").inner_text()
    match = re.fullmatch(r"(\d+\.\d) s", text.strip())
    assert match, f"countdown text {text!r}"
    return float(match.group(1))


def test_the_page_follows_the_breakers_live(
    dashboard: Callable[..., DashboardProcess], client: Brama, page: Page, tmp_path: Path
) -> None:
    """The page loads with no console error, every breaker grouped by scope; failures
    reported through the client turn the row open within 1 s of the opening command's
    return, the countdown runs, the feed shows circuit_opened, the row's chart holds the
    failures, the filter box hides what does not match; admin actions are off (no
    buttons, the API answers 404). Saves the screenshot."""
    dash = dashboard("--chart-window", "30")
    client.register("payment_api", scope="payments", wait=True, max_attempts=3,
                    expiry_ms=30_000)
    client.register("refunds_api", scope="payments", wait=True, max_attempts=5)
    client.register("ledger_db", scope="ledger", wait=True, max_attempts=3, expiry_ms=60_000)
    client.register("search", wait=True, strategy="failure_rate", window_size=20,
                    minimum_calls=10, failure_rate_threshold=50.0)
    for n in range(8):
        client.success("search", wait=n == 7)
        if n % 3 == 0:
            client.failure("search", reason="timeout")
    client.failure("refunds_api", scope="payments", reason="HTTP 503")
    client.success("refunds_api", scope="payments", wait=True)

    pg = page.page
    pg.goto(dash.url)
    pg.wait_for_selector("#live.up", timeout=10_000)
    pg.wait_for_function("document.querySelectorAll('tr.breaker').length === 4",
                         timeout=10_000)
    groups = pg.locator("tbody.scope-group tr.scope-head").all_inner_texts()
    assert groups == ["(no scope) 1 breaker", "ledger 1 breaker", "payments 2 breakers"], groups
    assert pg.locator("td.actions button").count() == 0
    assert pg.locator("#admin").is_hidden()
    assert pg.locator(row_selector("search", None) + " td.mode").inner_text() == "normal"

    payment = row_selector("payment_api", "payments")
    assert pg.get_attribute(payment, "data-state") == "closed"
    client.failure("payment_api", scope="payments", reason="HTTP 500", wait=True)
    client.failure("payment_api", scope="payments", reason="HTTP 500", wait=True)
    applied = client.failure("payment_api", scope="payments", reason="HTTP 500", wait=True)
    t0 = time.monotonic()
    assert applied is not None and "circuit_opened" in applied.event_names
    pg.wait_for_selector(payment + '[data-state="open"]', timeout=1_000)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    assert pg.locator(payment + " .badge").inner_text() == "open"

    feed = pg.locator('#feed li[data-event="circuit_opened"][data-connection="payment_api"]')
    assert feed.count() == 1 and "Threshold exceeded" in feed.inner_text()
    spark = pg.locator(payment + " svg.spark")
    assert spark.get_attribute("data-total") == "3"
    assert spark.locator("rect.fail").count() >= 1
    assert pg.locator(payment + " td.failures").inner_text() == "3/3"
    search = row_selector("search", None)
    assert pg.locator(search + " td.failures").inner_text() == "3 in window"
    # 3 failures in 11 calls: the owner's rate when its rows carry one, else the seen one
    rate = pg.locator(search + " td.rate")
    seen = "seen" in rate.inner_text()
    assert rate.inner_text().startswith("27%"), rate.inner_text()
    assert ("the events this dashboard saw" if seen else "reported by the owner") in (
        rate.get_attribute("title") or "")

    first, t1 = seconds_left(pg, payment), time.monotonic()
    assert 25.0 < first <= 30.0, first
    n = 0
    while time.monotonic() < t1 + 2.0:  # traffic meanwhile, so the charts fill (1 s bars)
        n += 1
        client.success("refunds_api", scope="payments")
        if n % 4:
            client.success("search")
        else:
            client.failure("search", reason="timeout")
        if n % 3 == 0:
            client.failure("refunds_api", scope="payments", reason="HTTP 503")
        time.sleep(0.1)
    second, t2 = seconds_left(pg, payment), time.monotonic()
    assert abs((first - second) - (t2 - t1)) < 0.5, (first, second, t2 - t1)
    bars = pg.locator(row_selector("refunds_api", "payments") + " svg.spark rect.fail")
    assert bars.count() >= 2

    def visible() -> list[str]:
        return sorted(t.get_attribute("data-connection") or ""
                      for t in pg.locator("tr.breaker").all() if t.is_visible())

    box = pg.locator("#filter")
    box.fill("ledger")
    assert visible() == ["ledger_db"]
    assert pg.locator('tbody.scope-group[data-scope="payments"]').is_hidden()
    box.fill("state:open")
    assert visible() == ["payment_api"]
    box.fill("payments conn:refunds")
    assert visible() == ["refunds_api"]
    box.fill("")
    assert visible() == ["ledger_db", "payment_api", "refunds_api", "search"]

    status, body = http(dash.url + "api/admin/close",
                        {"scope": "payments", "connection": "payment_api"}, token=TOKEN)
    assert status == 404 and "--admin" in body["error"]
    state = http(dash.url + "api/state")[1]
    assert state["admin"] is False and len(state["rows"]) == 4

    box.blur()
    pg.wait_for_timeout(1_200)  # the fresh-event highlight fades
    shot = tmp_path / "dashboard.png"
    pg.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BRAMA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    assert page.errors == []


def test_admin_actions_need_the_flag_and_the_token(
    dashboard: Callable[..., DashboardProcess], client: Brama, page: Page
) -> None:
    """With --admin and a token: the API refuses a request without it (401) or with a
    wrong one (403); the page given the token shows the buttons, and clicking close on
    an open circuit closes it at the owner."""
    dash = dashboard("--admin", "--admin-token", TOKEN)
    client.register("payment_api", scope="payments", wait=True)
    client.open("payment_api", scope="payments", expiry_ms=None, reason="maintenance", wait=True)
    target = {"scope": "payments", "connection": "payment_api"}
    status, body = http(dash.url + "api/admin/close", target)
    assert status == 401 and "Bearer" in body["error"]
    assert http(dash.url + "api/admin/close", target, token="not-the-token" * 2)[0] == 403
    assert http(dash.url + "api/admin/explode", target, token=TOKEN)[0] == 404
    status, body = http(dash.url + "api/admin/close", {"connection": "nope"}, token=TOKEN)
    assert status == 404, body
    assert client.status("payment_api", scope="payments")["state"] == "open"

    pg = page.page
    pg.goto(dash.url + "#token=" + TOKEN)
    row = row_selector("payment_api", "payments")
    pg.wait_for_selector(row + '[data-state="open"]', timeout=10_000)
    assert pg.locator(row + " td.left").inner_text() == "until closed"
    assert "token" not in pg.url  # taken from the address, kept in the session
    pg.locator(row + ' button[data-action="close"]').click()
    pg.wait_for_selector(row + '[data-state="closed"]', timeout=5_000)
    assert "close payments/payment_api: applied" in pg.locator("#admin-status").inner_text()
    assert client.status("payment_api", scope="payments")["state"] == "closed"
    assert page.errors == []


def test_the_command_refuses_bad_admin_settings_and_a_missing_topology(
    broker_url: str, prefix: str
) -> None:
    """A short token or --admin-token without --admin is a usage error (2); a prefix no
    owner ever declared is reported (4), not created."""
    env = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    port = str(free_port())
    r = run_cli(["dashboard", "--port", port, "--admin", "--admin-token", "short"], env)
    assert r.returncode == 2 and "at least 16 characters" in r.stderr, r.stderr
    r = run_cli(["dashboard", "--port", port, "--admin-token", TOKEN], env)
    assert r.returncode == 2 and "needs --admin" in r.stderr, r.stderr
    r = run_cli(["dashboard", "--port", port], env, timeout=30)
    assert r.returncode == 4, r.stderr


def test_the_compose_service_serves_the_page_and_passes_its_healthcheck(
    dashboard: Callable[..., DashboardProcess], broker_url: str, prefix: str
) -> None:
    """compose/'s dashboard service: its own command (another port, on one host) serves
    the page and its static files, and its healthcheck one-liner passes against it."""
    import yaml

    service = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())[
        "services"]["dashboard"]
    command = list(service["command"])
    assert command[:2] == ["brama-mq", "dashboard"] and "--admin" not in command
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    dash = dashboard(*command[2:])
    with urllib.request.urlopen(dash.url, timeout=10) as r:
        page_html = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert "static/dashboard.js" in page_html and "<script>" not in page_html
    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        with urllib.request.urlopen(f"{dash.url}static/{name}", timeout=10) as r:
            assert r.status == 200 and r.read()
    check = service["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    code = check[3].replace(":8088/", f":{port}/")
    done = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
