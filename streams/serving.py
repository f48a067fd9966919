"""Listening for HTTP in a worker: an address that cannot be bound is a configuration error, not a broker fault."""

from __future__ import annotations

from typing import Any

from budgetflow.schemas.errors import ConfigError

__all__ = ["listen"]


async def listen(site: Any, runner: Any, setting: str) -> None:
    """Start an aiohttp site; a port in use (or not ours to take) raises :class:`ConfigError` naming the setting."""
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {site.name}: {exc.strerror or exc} (set {setting}, 0 picks a free port)"
                          ) from exc  # fmt: skip
