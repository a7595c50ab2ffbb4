"""The package's layering, as import-linter checks it (contracts in pyproject.toml).

CI runs `lint-imports` too; running it here keeps the README's test command a complete
check, and the copies below prove each contract breaks when its rule is broken (a
contract that cannot fail would pin nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]' (or import-linter)")
    return subprocess.run(
        [exe, str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_package_keeps_every_import_contract() -> None:
    """brama_mq as committed keeps all contracts: layers, a sans-I/O core, kombu only in
    the transport."""
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def _broken(stdout: str) -> set[str]:
    """The names of the contracts import-linter reports BROKEN."""
    return {
        ln.rsplit(" ", 1)[0].strip()
        for ln in stdout.splitlines()
        if ln.rstrip().endswith(" BROKEN")
    }


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/policy.py", "import kombu", {"sans-io core", "kombu only in transport"}),
        # protocol sits above core, and its codec pulls in pydantic, which core must not.
        ("core/policy.py", "import brama_mq.protocol.codec", {"layers", "sans-io core"}),
        ("protocol/clock.py", "import brama_mq.transport", {"layers"}),
        ("client/outbox.py", "import brama_mq.owner", {"layers"}),
        ("subscribe/filters.py", "import brama_mq.client", {"layers"}),
        ("transport/topology.py", "import brama_mq.subscribe", {"layers"}),
        ("client/outbox.py", "import amqp", {"kombu only in transport"}),
    ],
)
def test_each_contract_breaks_when_its_rule_is_broken(
    tmp_path: Path, module: str, line: str, broken: set[str]
) -> None:
    """One forbidden import added to a copy of the package breaks exactly the contracts
    whose rule it breaks, and no other."""
    shutil.copytree(ROOT / "brama_mq", tmp_path / "brama_mq",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "brama_mq" / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # noqa\n",
                      encoding="utf-8")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert _broken(proc.stdout) == broken, proc.stdout
