"""gpulb: the shared core (settings, Redis key schema, Lua scripts, wire models and their readers, errors, logging).

The three roles — ``producer``, ``balancer`` and ``worker`` — import only this package,
never each other, and the core imports none of them. Only the operator's front end,
:mod:`gpulb.cli`, knows all three, because it launches them.
"""

__version__ = "0.1.0"
