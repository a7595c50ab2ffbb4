"""The README's Celery example, run as written (eagerly, against an in-process owner)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from brama_mq.celery import shutdown_runtimes
from brama_mq.client import Brama
from brama_mq.errors import CircuitOpenError
from brama_mq.owner import run_owner
from brama_mq.transport import MemoryTransport

README = Path(__file__).resolve().parent.parent / "README.md"


def celery_example() -> str:
    section = README.read_text().split("\n## Celery\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Celery section has one Python example"
    return blocks[0]


def test_readme_celery_example_runs_as_written(memory_transport: MemoryTransport) -> None:
    """The README's Celery example runs as written: charges while closed, refuses when open."""
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(celery_example(), str(README), "exec"), namespace)
    app, charge = namespace["app"], namespace["charge"]
    assert app.conf.brama_fail_mode == "open"
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        client.register("payment_api", scope="payments", wait=True)
        app.conf.update(task_always_eager=True, brama_client=client)
        assert charge.delay("o-1").get() == {"order": "o-1", "status": "charged"}
        client.open("payment_api", scope="payments", expiry_ms=None, wait=True)
        view = client.local_view
        assert view is not None
        deadline = time.monotonic() + 5
        while view.state("payment_api", "payments") != "open":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(CircuitOpenError):
            charge.apply(args=("o-2",), throw=True)
    finally:
        shutdown_runtimes()
        client.disconnect()
        owner.stop(wait=5)
