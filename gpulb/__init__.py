"""gpulb: the shared core (settings, Redis key schema, wire models, errors, logging, CLI).

The three roles — ``producer``, ``balancer`` and ``worker`` — import only this package,
never each other. Only :mod:`gpulb.cli` knows all three, because it launches them.
"""

__version__ = "0.1.0"
