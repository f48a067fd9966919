"""Running the workers: one role per process, or `all` as two supervised child processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.retry import Backoff

__all__ = ["RepeatFilter", "Start", "run_role", "supervise"]

Start = Callable[[Settings, asyncio.Event], Awaitable[None]]
"""A role's work: build it from the settings and run it until the event is set (each role's package offers one)."""
log = logging.getLogger("budgetflow.worker")


def configure_logging(settings: Settings, role: str) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiokafka is chatty about retries it handles itself.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())


class RepeatFilter(logging.Filter):
    """At most one line of each aiokafka message every ``window_s``, then the count of those held back.

    While a broker of a cluster is down, aiokafka logs the same connection and fetch errors about a hundred times a
    second in every worker, although it retries them itself (the cluster tests count 2,000 lines a run).
    """

    def __init__(self, prefix: str = "aiokafka", window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.prefix, self.window_s, self.clock = prefix, window_s, clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # per message template: (shown at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        shown, held = self._seen.get(key, (None, 0))
        if shown is not None and now - shown < self.window_s:
            self._seen[key] = (shown, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {now - shown:.0f} s)"  # type: ignore[operator]
        return True


# Errors no restart can cure: the settings (or the credentials they name) are wrong. The worker exits with one line.
_FATAL_KAFKA = (
    "AuthenticationFailedError",
    "SaslAuthenticationFailed",
    "UnsupportedSaslMechanismError",
    "IllegalSaslStateError",
    "TopicAuthorizationFailedError",
    "GroupAuthorizationFailedError",
    "ClusterAuthorizationFailedError",
    "KafkaConfigurationError",
    "InvalidConfigurationError",
    "UnsupportedVersionError",
)
EXIT_CONFIG = 2


def _fatal(exc: BaseException) -> str | None:
    """One line saying what is wrong, for an error that is the configuration's, not the broker's; else None."""
    from budgetflow.schemas.errors import ConfigError

    if isinstance(exc, ConfigError):
        return str(exc)
    if exc.__class__.__name__ in _FATAL_KAFKA:
        return f"Kafka refused this worker's configuration or credentials: {exc.__class__.__name__}: {exc}"
    return None


async def _run(role: str, settings: Settings, start: Start) -> int:
    """Run the role until a signal; if the broker goes away, tear down and start again with a backoff.

    A restart is a recovery like any other: state comes back from the store and the changelog,
    and the idempotent ledger absorbs whatever is replayed. A configuration error exits at once
    (status 2); a stop takes at most ``worker.shutdown_timeout_s``, whatever the broker does.
    """
    from aiokafka.errors import KafkaError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backoff = Backoff(first=1.0, cap=30.0)
    while not stop.is_set():
        began = loop.time()
        try:
            if not await _bounded(_once(start, settings, stop), stop, settings.worker.shutdown_timeout_s):
                log.error(
                    "%s worker did not stop within %.0f s (WORKER__SHUTDOWN_TIMEOUT_S); exiting without a "
                    "clean close (nothing is committed before it is durable)",
                    role,
                    settings.worker.shutdown_timeout_s,
                )
                # Its tasks may hang on a broker that does not answer: leave them, do not wait for them.
                logging.shutdown()
                os._exit(1)
        except Exception as exc:
            fatal = _fatal(exc)
            if fatal is not None:
                log.error("%s worker cannot run: %s", role, fatal)
                return EXIT_CONFIG
            if not isinstance(exc, (KafkaError, OSError, TimeoutError)):
                raise
            if stop.is_set():
                break
            if loop.time() - began > 60:
                backoff.reset()  # it ran for a while: this is a new outage
            log.warning(
                "%s worker lost the broker (%s: %s); restarting in %.0f s",
                role,
                exc.__class__.__name__,
                exc,
                backoff.delay,
            )
            await backoff.wait(stop)
    return 0


async def _bounded(work: Coroutine[Any, Any, None], stop: asyncio.Event, timeout_s: float) -> bool:
    """Run ``work``; once ``stop`` is set give it ``timeout_s`` to finish, then cancel it. False: it would not stop."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        await asyncio.wait({task}, timeout=timeout_s)
    if task.done():
        task.result()  # the worker's own error, if it failed
        return True
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    if not task.done():
        return False
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
    return True


async def _once(start: Start, settings: Settings, stop: asyncio.Event) -> None:
    await start(settings, stop)


def run_role(role: str, settings: Settings, start: Start) -> int:
    """Run one role (``start``) in this process until SIGTERM or SIGINT; the exit status (2: a configuration
    error)."""
    configure_logging(settings, role)
    return asyncio.run(_run(role, settings, start))


def supervise(roles: list[str]) -> int:
    """Run each role as a child process; stop all when one exits or on SIGTERM/SIGINT."""
    from budgetflow.streams.service.launch import spawn_worker

    children = {role: spawn_worker(role) for role in roles}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while any(child.poll() is None for child in children.values()):
        for role, child in children.items():
            if child.poll() is not None and not stopping:
                log.error("%s worker exited with %s; stopping the others", role, child.returncode)
                code = child.returncode or 1
                stop()
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
    return code
