"""budgetflow's moving parts: the local broker, the workers, the CLI.

Importing this package imports nothing heavy: gateways import the publisher
and the view from here without pulling in Faust.
"""

from __future__ import annotations

__all__: list[str] = []
