"""``brama-mq dashboard``: every breaker of a deployment on a live web page.

* :mod:`~brama_mq.dashboard.board`: what the page shows (rows, recent events, failures
  per bucket), plain data fed by the owner's snapshot and the events;
* :mod:`~brama_mq.dashboard.feed`: the fan-out of changes to the open pages;
* :mod:`~brama_mq.dashboard.app`: :class:`Dashboard`, the Starlette app run by uvicorn
  and fed by a transient subscription; the page itself is package data under
  ``static/`` (plain HTML, CSS and JavaScript, nothing loaded from elsewhere).

Needs the ``dashboard`` extra (``pip install 'brama-mq[dashboard]'``: Starlette and
uvicorn). The command line (:mod:`brama_mq.cli.dashboard`) builds the transport and
runs it; admin actions are off unless it is given ``--admin`` (then with a token).
"""

from brama_mq.dashboard.app import ADMIN_ACTIONS, Dashboard
from brama_mq.dashboard.board import Board

__all__ = ["ADMIN_ACTIONS", "Board", "Dashboard"]
