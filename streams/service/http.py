"""Listening for HTTP in a worker: an address that cannot be bound is a configuration error, not a broker fault."""

from __future__ import annotations

import os
from typing import Any

from budgetflow.schemas.errors import ConfigError

__all__ = ["listen"]


async def listen(runner: Any, host: str, port: int, setting: str) -> Any:
    """Start an aiohttp site on ``host:port``; a port in use (or not ours to take) raises :class:`ConfigError`
    naming the address and the setting that chose it."""
    from aiohttp import web

    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why} (set {setting}; 0 picks a free port)") from exc
    return site
