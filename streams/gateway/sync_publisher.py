"""The publisher for gateways that are not async: a :class:`BudgetPublisher` on an event loop of its own, in a
thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from budgetflow.schemas.settings import Settings
from budgetflow.streams.gateway.publisher import BudgetPublisher, RequestHandle
from budgetflow.streams.gateway.usage import Usage

__all__ = ["SyncBudgetPublisher"]

T = TypeVar("T")


class SyncBudgetPublisher:
    """The publisher for gateways that are not async: an event loop of its own in a thread."""

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="budgetflow-publisher", daemon=True)
        self._thread.start()
        self._publisher = self._call(_make(settings, kwargs))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def publish_request(self, **kwargs: Any) -> RequestHandle:
        return self._call(self._publisher.publish_request(**kwargs))

    def publish_usage(self, handle: RequestHandle, usage: Usage, **kwargs: Any) -> None:
        self._call(self._publisher.publish_usage(handle, usage, **kwargs))

    def flush(self, timeout_s: float = 30.0) -> None:
        self._call(self._publisher.flush(timeout_s))

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._publisher.counts)

    def close(self) -> None:
        self._call(self._publisher.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> SyncBudgetPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(settings: Settings | None, kwargs: dict[str, Any]) -> BudgetPublisher:
    publisher = BudgetPublisher(settings, **kwargs)
    await publisher.start()
    return publisher
