"""HTTP in a worker: one way to serve an app, check credentials and answer JSON.

Every HTTP surface (the enrich metrics port, the aggregate's stats API, `budgetflow view serve`) is an aiohttp
app started by :func:`serve`: an address that cannot be bound is a configuration error naming the setting that
chose it, not a broker fault. ``/metrics`` is prometheus_client's own aiohttp handler.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.serde import dumps

__all__ = [
    "FORWARDED",
    "bearer_guard",
    "credential_bytes",
    "json_response",
    "peer_origin",
    "serve",
    "worker_app",
]

FORWARDED = "X-Budgetflow-Forwarded"
"""The header an aggregate worker sets when it forwards a stats request to the worker holding the budget."""
_OPEN_PATHS = ("/healthz", "/metrics")
_LABEL = re.compile(r"^[a-z0-9-]+$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Health = Callable[[], tuple[bool, dict[str, Any]]]


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON through the project's one JSON seam (decimal strings stay strings)."""
    return web.Response(body=dumps(data), status=status, content_type="application/json")


def worker_app(registry: CollectorRegistry, health: Health, middlewares: Sequence[Any] = ()) -> web.Application:
    """An app with ``/metrics`` (the registry) and ``/healthz`` (200 when ``health()`` says ready, else 503)."""

    async def healthz(_: web.Request) -> web.Response:
        ready, body = health()
        return json_response(body, status=200 if ready else 503)

    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    return app


async def serve(app: web.Application, host: str, port: int, setting: str) -> web.AppRunner:
    """Start ``app`` on ``host:port`` (0: a free port, read it from ``runner.addresses``)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await _listen(runner, host, port, setting)
    return runner


async def _listen(runner: web.AppRunner, host: str, port: int, setting: str) -> web.TCPSite:
    """Start a site on ``host:port``; a port in use (or not ours to take) raises :class:`ConfigError` naming the
    address and the setting that chose it."""
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why} (set {setting}; 0 picks a free port)") from exc
    return site


def credential_bytes(header: str) -> bytes:
    """A header's bytes as they came over the wire (aiohttp decodes headers as UTF-8 with surrogateescape).

    Tokens are compared as bytes: ``hmac.compare_digest`` refuses ``str`` with non-ASCII characters.
    """
    return header.encode("utf-8", "surrogateescape")


def bearer_guard(token: str | None, *, peer_token: str | None = None) -> Any:
    """Middleware: when a token is configured, every route but /healthz and /metrics requires it.

    A stats request forwarded by another aggregate worker (:data:`FORWARDED`, ``GET /v1/budgets/{id}``) may
    present the peer token instead; the peer token opens nothing else.
    """
    expected = credential_bytes(f"Bearer {token}") if token else None
    peer = credential_bytes(f"Bearer {peer_token}") if peer_token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in _OPEN_PATHS:
            return await handler(request)
        given = credential_bytes(request.headers.get("Authorization", ""))
        if hmac.compare_digest(given, expected):
            return await handler(request)
        forwarded = request.method == "GET" and request.path.startswith("/v1/budgets/") and FORWARDED in request.headers
        if peer is not None and forwarded and hmac.compare_digest(given, peer):
            return await handler(request)
        return json_response({"error": "unauthorized"}, status=401)

    return guard


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a base URL with nothing else in it (no user, path, query or fragment)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or parts.username is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    return parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80)


def peer_origin(url: str, peers: Sequence[str]) -> str | None:
    """The origin to forward to when ``url`` (a heartbeat's owner) is one of ``peers``, else None.

    A peer is an origin (``http://host:port``); a host written ``*.rest`` matches one DNS label before ``rest``
    (a StatefulSet pod behind its headless Service).
    """
    owner = _origin(url)
    if owner is None:
        return None
    scheme, host, port = owner
    for peer in peers:
        pattern = _origin(peer)
        if pattern is None or pattern[0] != scheme or pattern[2] != port:
            continue
        wanted = pattern[1]
        if wanted.startswith("*."):
            label, _, rest = host.partition(".")
            matched = bool(_LABEL.match(label)) and rest == wanted[2:]
        else:
            matched = host == wanted
        if matched:
            netloc = f"[{host}]" if ":" in host else host
            return f"{scheme}://{netloc}:{port}"
    return None
