"""Named crash points for the exactly-once tests: SIGKILL this process at a chosen moment.

Armed only when both ``BUDGETFLOW_TESTING`` and ``BUDGETFLOW_TEST_CRASH_AT`` are
set: ``name`` crashes at the first pass through that point, ``name:N`` at the
N-th. Production code passes through them at no cost.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_due", "crash_now", "crash_point"]

_spec = os.environ.get("BUDGETFLOW_TEST_CRASH_AT", "")
_testing = os.environ.get("BUDGETFLOW_TESTING", "").lower() in ("1", "true", "yes")
_name, _, _nth = _spec.partition(":")
_remaining = int(_nth) if _nth.isdigit() else 1
_ARMED = bool(_spec) and _testing


def crash_due(name: str) -> bool:
    """Count a pass through ``name``; True when this pass is the one to crash at.

    For points that must set the scene first (make part of a batch durable),
    then call :func:`crash_now`.
    """
    global _remaining  # noqa: PLW0603  # a process-wide countdown is the point
    if not _ARMED or name != _name or _remaining <= 0:
        return False
    _remaining -= 1
    return _remaining == 0


def crash_now() -> None:
    """SIGKILL this process: no cleanup, no flush, exactly like a crash."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(name: str) -> None:
    """SIGKILL the process here if this is the armed point and its turn has come."""
    if crash_due(name):
        crash_now()
