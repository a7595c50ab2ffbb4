"""``python -m brama_mq.cli``: the ``brama-mq`` command."""

from brama_mq.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
