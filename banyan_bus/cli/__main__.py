"""``python -m banyan_bus.cli``: the ``banyan`` command (how ``--workers`` starts its workers)."""

from banyan_bus.cli import main

main()
