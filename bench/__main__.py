"""``python -m bench`` / ``python -m bench NAME [--json] [scenario options]``."""

from __future__ import annotations

import json
import sys
from typing import Any

from bench import SCENARIOS, load

USAGE = "usage: python -m bench [list | SCENARIO [--json] [options] | SCENARIO --help]"


def _listing() -> str:
    width = max(len(name) for name in SCENARIOS)
    lines = ["scenarios:"]
    lines += [f"  {name:<{width}}  {s.description}" for name, s in SCENARIOS.items()]
    lines.append(USAGE)
    return "\n".join(lines)


def _plain(result: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in result.items())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("list", "-l", "--list", "-h", "--help"):
        print(_listing())
        return 0
    name, rest = args[0], args[1:]
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}\n{_listing()}", file=sys.stderr)
        return 2
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    module = load(name)
    result: dict[str, Any] = module.run(rest)
    if as_json:
        print(json.dumps(result))
    else:
        report = getattr(module, "format_report", _plain)
        print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
