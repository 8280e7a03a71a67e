"""The operator's front end: the ``gpulb`` command and the local stacks it starts.

This package is the top floor: it alone knows all three roles (``producer``, ``balancer``,
``worker``), because it launches them. The core below it (the rest of :mod:`gpulb`) imports none.
"""

from gpulb.cli.main import main

__all__ = ["main"]
