"""BudgetPublisher: what a gateway calls to publish its requests and their usage.

::

    async with BudgetPublisher(settings) as publisher:
        handle = await publisher.publish_request(request_id=rid, model="gpt-4o", provider="openai",
                                                 backend="cloud", budgets=["team:search"], messages=messages)
        ...  # call the model
        await publisher.publish_usage(handle, from_openai(response.usage))

Both validate the event and return without waiting for the broker: events go
to a bounded buffer that a background task sends with an idempotent producer.
When the buffer is full (the broker is slow or away), a usage event is never
dropped: it is appended to a bounded spool file and delivered when the broker
is back (the aggregate's dedupe makes a redelivery harmless). A request
follows ``on_full``: ``block`` waits for room, ``drop_request`` publishes
nothing (the usage still settles it), ``reject_cloud`` (default) publishes
nothing and tells the gateway not to send it to a cloud model, whose spend
could then not be reserved. It imports no Faust and no RocksDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from budgetflow.schemas.errors import BudgetflowError, InvalidEvent
from budgetflow.schemas.events import RequestEvent, UsageEvent
from budgetflow.schemas.serde import describe_validation_error, dumps, loads
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.clients import client_options
from budgetflow.streams.clock import Clock
from budgetflow.streams.topics import Topics
from budgetflow.streams.usage import Usage

__all__ = ["BudgetPublisher", "RequestHandle", "SpoolFull", "SyncBudgetPublisher"]

log = logging.getLogger(__name__)

OnFull = Literal["block", "drop_request", "reject_cloud"]
T = TypeVar("T")


class SpoolFull(BudgetflowError):
    """The usage spool reached its size limit: the broker has been away too long."""


@dataclass(frozen=True)
class RequestHandle:
    """What ``publish_usage`` needs of the request, and whether the request was recorded."""

    request_id: str
    attempt: int
    occurred_at: datetime
    budgets: tuple[str, ...]
    model: str
    provider: str
    backend: Literal["cloud", "local"]
    metadata: tuple[tuple[str, str], ...] = ()
    accepted: bool = True
    cloud_allowed: bool = True


@dataclass(frozen=True)
class _Item:
    topic: str
    key: bytes
    value: bytes
    usage: bool


class _Spool:
    """Usage events waiting for the broker: JSON lines in segment files, bounded in bytes."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("spool-*.jsonl"))

    def append(self, item: _Item) -> None:
        line = dumps({"topic": item.topic, "key": item.key.decode(), "value": item.value.decode()}) + b"\n"
        with self._lock:
            if self.size() + len(line) > self.max_bytes:
                raise SpoolFull(f"usage spool {self.directory} is full ({self.max_bytes} bytes)")
            segments = sorted(self.directory.glob("spool-*.jsonl"))
            current = segments[-1] if segments and segments[-1].stat().st_size < 4 << 20 else None
            if current is None:
                current = self.directory / f"spool-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}.jsonl"
            with current.open("ab") as handle:
                handle.write(line)
                handle.flush()

    def oldest(self) -> tuple[Path, list[_Item]] | None:
        with self._lock:
            segments = sorted(self.directory.glob("spool-*.jsonl"))
            if not segments:
                return None
            # Seal it: later appends go to a new segment, so this one can be deleted once delivered.
            sealed = segments[0].with_suffix(".sending")
            segments[0].rename(sealed)
        items = []
        for line in sealed.read_bytes().splitlines():
            if line.strip():
                raw = loads(line)
                items.append(_Item(raw["topic"], raw["key"].encode(), raw["value"].encode(), True))
        return sealed, items

    def recover_unsent(self) -> None:
        """Segments that were being sent when the process died go back in the queue."""
        for sealed in self.directory.glob("spool-*.sending"):
            sealed.rename(sealed.with_suffix(".jsonl"))


class BudgetPublisher:
    """Publishes RequestEvent and UsageEvent records for a gateway; never blocks on the broker."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        on_full: OnFull | None = None,
        buffer_max: int | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        config = self.settings.publisher
        self.topics = Topics.from_settings(self.settings)
        self.on_full: OnFull = on_full or config.on_full
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=buffer_max or config.buffer_max)
        self._spool = _Spool(spool_dir or Path(self.settings.data_dir) / "spool", config.spool_max_bytes)
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._healthy_at = 0.0
        self.clock = Clock(self.settings.clock)
        self.counts: dict[str, int] = {
            "requests_published": 0, "usage_published": 0, "requests_failed": 0, "usage_spooled": 0,
            "usage_replayed": 0, "requests_dropped": 0, "requests_rejected_cloud": 0, "requests_blocked": 0,
        }  # fmt: skip

    # -- life cycle -------------------------------------------------------------------
    async def __aenter__(self) -> BudgetPublisher:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **{
                **client_options(self.settings.kafka),
                "request_timeout_ms": self.settings.publisher.delivery_timeout_ms,
            },
            enable_idempotence=True,
            acks="all",
            linger_ms=self.settings.publisher.linger_ms,
        )
        await self._producer.start()
        self._spool.recover_unsent()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="publisher-send"),
            asyncio.create_task(self._replay_loop(), name="publisher-replay"),
        ]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered (up to ``timeout_s``); spool usage that could not be sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item.usage:
                self._spool_item(item)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=timeout_s)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout_s)

    # -- publishing -----------------------------------------------------------------------
    async def publish_request(
        self,
        *,
        request_id: str,
        model: str,
        provider: str,
        backend: Literal["cloud", "local"],
        budgets: Sequence[str] = (),
        messages: Sequence[dict[str, Any]] | None = None,
        prompt: str | None = None,
        input_bytes: int | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        n: int | None = None,
        session_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        attempt: int = 0,
        occurred_at: datetime | None = None,
    ) -> RequestHandle:
        """Validate and buffer a RequestEvent; raises :class:`InvalidEvent` for a bad one."""
        when = occurred_at or self.clock.now()
        event = _validated(RequestEvent, {
            "request_id": request_id, "attempt": attempt, "occurred_at": when, "budgets": list(budgets),
            "model": model, "provider": provider, "backend": backend, "session_id": session_id,
            "metadata": dict(metadata or {}), "prompt": prompt,
            "messages": list(messages) if messages is not None else None,
            "input_bytes": input_bytes, "tools": list(tools) if tools is not None else None,
            "max_tokens": max_tokens, "max_completion_tokens": max_completion_tokens, "n": n,
        })  # fmt: skip
        handle = RequestHandle(event.request_id, event.attempt, event.occurred_at, tuple(event.budgets), event.model,
                               event.provider, event.backend, tuple(sorted(event.metadata.items())))  # fmt: skip
        item = _Item(self.topics.requests.name, event.request_id.encode(), dumps(event), usage=False)
        if self._queue.full():
            if self.on_full == "drop_request":
                self.counts["requests_dropped"] += 1
                return _replace(handle, accepted=False)
            if self.on_full == "reject_cloud":
                self.counts["requests_rejected_cloud"] += 1
                return _replace(handle, accepted=False, cloud_allowed=False)
            self.counts["requests_blocked"] += 1
        await self._queue.put(item)
        return handle

    async def publish_usage(
        self,
        handle: RequestHandle,
        usage: Usage,
        *,
        outcome: Literal["completed", "failed", "cancelled"] = "completed",
        occurred_at: datetime | None = None,
        model: str | None = None,
    ) -> None:
        """Validate and buffer the UsageEvent of a request; if the buffer is full, spool it (never drop it)."""
        event = _validated(UsageEvent, {
            "request_id": handle.request_id, "attempt": handle.attempt, "request_occurred_at": handle.occurred_at,
            "occurred_at": occurred_at or self.clock.now(), "budgets": list(handle.budgets),
            "model": model or handle.model, "provider": handle.provider, "backend": handle.backend,
            "metadata": dict(handle.metadata),
            "request_model": handle.model if model and model != handle.model else None,
            "outcome": outcome, "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
            "cache_write_input_tokens": usage.cache_write_input_tokens, "reasoning_tokens": usage.reasoning_tokens,
        })  # fmt: skip
        item = _Item(self.topics.usage.name, event.request_id.encode(), dumps(event), usage=True)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._spool_item(item)

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    def spool_bytes(self) -> int:
        return self._spool.size()

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything buffered has been handed to the broker (tests, shutdown)."""
        await asyncio.wait_for(self._queue.join(), timeout_s)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=timeout_s)

    # -- background -------------------------------------------------------------------------
    def _spool_item(self, item: _Item) -> None:
        self._spool.append(item)
        self.counts["usage_spooled"] += 1

    async def _send_loop(self) -> None:
        assert self._producer is not None
        while True:
            item = await self._queue.get()
            try:
                future = await self._producer.send(item.topic, key=item.key, value=item.value)
            except Exception as exc:  # noqa: BLE001  # the broker is away: never lose a usage event
                self._failed(item, exc)
            else:
                self._in_flight.add(future)
                future.add_done_callback(lambda f, item=item: self._delivered(f, item))
            finally:
                self._queue.task_done()

    def _delivered(self, future: asyncio.Future[Any], item: _Item) -> None:
        self._in_flight.discard(future)
        if future.cancelled() or future.exception() is not None:
            self._failed(item, future.exception() if not future.cancelled() else None)
            return
        self._healthy_at = asyncio.get_running_loop().time()
        self.counts["usage_published" if item.usage else "requests_published"] += 1

    def _failed(self, item: _Item, exc: BaseException | None) -> None:
        if item.usage:
            log.warning("usage not delivered (%s); spooled", exc.__class__.__name__ if exc else "cancelled")
            self._spool_item(item)
        else:
            self.counts["requests_failed"] += 1

    async def _replay_loop(self) -> None:
        """Deliver spooled usage once the broker takes records again."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.publisher.replay_interval_s)
            healthy = loop.time() - self._healthy_at < 30
            if not healthy and self._queue.qsize() == 0 and not self._in_flight:
                # Nothing in flight tells us whether the broker is back: probe with the oldest segment.
                healthy = True
            if not healthy or self._queue.qsize() > self._queue.maxsize // 2:
                continue
            batch = self._spool.oldest()
            if batch is None:
                continue
            sealed, items = batch
            for item in items:
                await self._queue.put(item)
                self.counts["usage_replayed"] += 1
            # Undelivered items are spooled again by the send path, so the sealed copy can go.
            await self._queue.join()
            sealed.unlink(missing_ok=True)


def _validated(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate({k: v for k, v in data.items() if v is not None})  # type: ignore[attr-defined, no-any-return]
    except ValidationError as exc:
        reason, message = describe_validation_error(exc)
        raise InvalidEvent(reason, message) from exc


def _replace(handle: RequestHandle, **changes: Any) -> RequestHandle:
    from dataclasses import replace

    return replace(handle, **changes)


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
