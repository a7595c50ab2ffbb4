"""``brama-mq``: the command line, one role per module.

* :mod:`~brama_mq.cli.commands`: the ``brama-mq`` group (:func:`main`), ``demo``,
  ``worker``, ``watch`` and ``completion``;
* :mod:`~brama_mq.cli.options`: the TLS and shard-count flags the commands share;
* :mod:`~brama_mq.cli.admin`: ``status`` and the commands that steer breakers;
* :mod:`~brama_mq.cli.watch`: what ``brama-mq watch`` shows (:func:`run_watch`);
* :mod:`~brama_mq.cli.demo`: the one-process demo (:func:`run_demo`).

The entry point is ``brama_mq.cli:main``; ``python -m brama_mq.cli`` runs it too.
Exit codes scripts can rely on: 0 ok, 1 the operation failed (broker away, refused),
2 bad usage or settings, 3 not registered, 4 no owner answered (admin commands).
"""

from brama_mq.cli.commands import EXIT_FAILED, EXIT_USAGE, main

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "main"]
