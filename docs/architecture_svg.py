"""Writes docs/architecture.svg, the picture in the README (no graphviz needed).

    python docs/architecture_svg.py          # rewrite the SVG after changing this file

The layout is plain coordinates; a test checks that the committed SVG is what this
script writes, so the picture never drifts from its source.
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

OUT = Path(__file__).resolve().parent / "architecture.svg"
W, H = 980, 540

_parts: list[str] = []


def box(x: int, y: int, w: int, h: int, title: str, lines: tuple[str, ...] = (),
        fill: str = "#ffffff", stroke: str = "#333333", dashed: bool = False) -> None:
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    _parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" '
                  f'stroke="{stroke}" stroke-width="1.5"{dash}/>')
    _parts.append(f'<text x="{x + w // 2}" y="{y + 20}" class="t">{escape(title)}</text>')
    for i, line in enumerate(lines):
        _parts.append(f'<text x="{x + w // 2}" y="{y + 40 + 16 * i}" class="s">'
                      f'{escape(line)}</text>')


def arrow(x1: int, y1: int, x2: int, y2: int, text: str = "", *, dx: int = 0, dy: int = -6,
          color: str = "#333333", dashed: bool = False, via: tuple[tuple[int, int], ...] = (),
          ) -> None:
    """A line (through the ``via`` points) with an arrow head at (x2, y2)."""
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    points = " ".join(f"{x},{y}" for x, y in ((x1, y1), *via, (x2, y2)))
    _parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" '
                  f'stroke-width="1.6" marker-end="url(#head)"{dash}/>')
    if text:
        lx, ly = via[-1] if via else ((x1 + x2) // 2, (y1 + y2) // 2)
        _parts.append(f'<text x="{lx + dx}" y="{ly + dy}" class="l">{escape(text)}</text>')


def label(x: int, y: int, text: str, cls: str = "h") -> None:
    _parts.append(f'<text x="{x}" y="{y}" class="{cls}">{escape(text)}</text>')


def draw() -> str:
    _parts.clear()
    label(W // 2, 28, "brama_mq: one owner per breaker, events on a topic exchange")
    # clients
    box(20, 70, 210, 92, "Brama client", ("register / success / failure", "open / close / reset"))
    box(20, 182, 210, 60, "brama-mq CLI", ("status / open / close / ...",))
    box(20, 262, 210, 92, "Celery worker (prefork)",
        ("@guarded tasks", "local view: check in ~0.1 µs"), fill="#eef6ff")
    # broker
    box(270, 56, 330, 384, "RabbitMQ", (), fill="#fff8ec", stroke="#c07a00")
    box(290, 90, 290, 50, "brama.commands", ("direct exchange",))
    box(290, 170, 290, 64, "brama.owner", ("quorum queue, single active consumer",
                                          "(shards: brama.owner.<k>)"))
    box(290, 264, 290, 50, "brama.events", ("topic exchange: scope.connection.event",))
    box(290, 370, 290, 50, "brama.dead", ("commands that could not be applied",))
    # owners
    box(640, 150, 150, 76, "owner (active)", ("brama-mq worker", "engine: every breaker"),
        fill="#eaffea", stroke="#2a7d2a")
    box(640, 246, 150, 60, "owner (standby)", ("waits for its turn",), dashed=True)
    # subscribers
    box(820, 330, 150, 108, "subscribers", ("subscribe(filter)", "named / transient",
                                            "workers/monitor.py", "brama-mq watch"))
    # metrics
    box(640, 462, 150, 60, "Prometheus", ("/metrics of owners", "and Celery workers"),
        fill="#f3eeff", stroke="#6a4fb3")
    box(820, 462, 150, 60, "Grafana", ("dashboard brama_mq",), fill="#f3eeff",
        stroke="#6a4fb3")
    # flows
    arrow(230, 110, 290, 112, "commands")
    arrow(230, 212, 290, 126)
    arrow(230, 290, 290, 134, "outcomes", dx=-8, dy=40, via=())
    arrow(435, 140, 435, 170, "routing key owner", dx=56, dy=4)
    arrow(580, 195, 640, 185, "consume", dy=-8)
    arrow(580, 215, 640, 270, dashed=True)
    arrow(650, 226, 580, 285, "publish", dx=-4, dy=16)
    arrow(640, 220, 580, 395, "dead-letter", dx=40, dy=60)
    arrow(580, 300, 820, 370, "bindings = filters", dx=20, dy=-10)
    arrow(290, 300, 230, 318, "state_change", dx=-4, dy=-12)
    arrow(715, 306, 715, 462, "/metrics", dx=28, dy=40, color="#6a4fb3", dashed=True)
    arrow(125, 354, 640, 500, "guard checks /metrics", color="#6a4fb3", dashed=True,
          via=((125, 500),), dx=260, dy=-6)
    arrow(790, 492, 820, 492, color="#6a4fb3")
    style = (
        "<style>text{font-family:Helvetica,Arial,sans-serif;text-anchor:middle;fill:#222}"
        ".h{font-size:17px;font-weight:bold}.t{font-size:14px;font-weight:bold}"
        ".s{font-size:11.5px;fill:#444}.l{font-size:11px;fill:#555;font-style:italic}"
        "</style>"
    )
    defs = ('<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            'fill="#333"/></marker></defs>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}">\n{style}\n{defs}\n'
            f'<rect width="{W}" height="{H}" fill="#fcfcfc"/>\n' + "\n".join(_parts) + "\n</svg>\n")


if __name__ == "__main__":
    OUT.write_text(draw())
    sys.stdout.write(f"wrote {OUT}\n")
