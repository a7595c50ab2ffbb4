"""The docs describe the repository as it is: docs/architecture.md's module tree names
every module of brama_mq (one line each) and nothing that is gone, and no doc points to a
file the repository does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level folders a repository path in the docs may start with.
TOP = ("brama_mq/", "tests/", "bench/", "workers/", "compose/", "docs/", ".ci/")


def _tree_section() -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    start = text.index("## Module tree")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _modules() -> set[str]:
    return {
        str(p.relative_to(ROOT))
        for p in (ROOT / "brama_mq").rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_the_module_tree_names_every_module_once() -> None:
    """Each brama_mq/**/*.py file has its own line in the tree; the tree names no module
    that does not exist."""
    section = _tree_section()
    listed = re.findall(r"`(brama_mq/[\w/]+\.py)`", section)
    modules = _modules()
    missing = sorted(modules - set(listed))
    gone = sorted(set(listed) - modules)
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not missing, f"modules missing from docs/architecture.md's tree: {missing}"
    assert not gone, f"the tree names modules that do not exist: {gone}"
    assert not twice, f"listed more than once: {twice}"


def test_docs_point_only_to_files_that_exist() -> None:
    """Every repository path written in backticks or as a link in README.md and docs/
    exists (a file or a folder)."""
    wrong = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        quoted = set(re.findall(r"`([\w./-]+)`", text))
        links = set(re.findall(r"\]\((?![a-z]+:)([^)#\s]+)", text))  # not URLs
        for raw in sorted(quoted | links):
            path = raw.rstrip("/.,")
            if any(ch in path for ch in "*{}<>$"):
                continue  # a pattern or placeholder, not a path
            if path.startswith(TOP):
                target = ROOT / path
            elif raw in links:
                target = doc.parent / path  # a link is relative to its document
            else:
                continue  # a queue, module or URL path: not a repository file
            if not target.exists():
                wrong.append(f"{doc.relative_to(ROOT)}: {raw}")
    assert not wrong, wrong
