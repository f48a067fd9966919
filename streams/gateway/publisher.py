"""BudgetPublisher: what a gateway calls to publish its requests and their usage.

::

    async with BudgetPublisher(settings) as publisher:
        handle = await publisher.publish_request(request_id=rid, model="gpt-4o", provider="openai",
                                                 backend="cloud", budgets=["team:search"], messages=messages)
        ...  # call the model
        await publisher.publish_usage(handle, from_openai(response.usage))

Both validate the event and return without waiting for the broker: events go
to a bounded buffer that a background task sends with an idempotent producer.
A usage event is never dropped: before it is buffered it is written to the
spool (:mod:`budgetflow.streams.gateway.spool`, a write-ahead log fsynced every few
milliseconds), which deletes it once the broker acknowledged it; when the
buffer is full (the broker is slow or away) it waits there, and a publisher
killed at any moment sends it when it starts again (the aggregate's dedupe
makes a redelivery harmless). The publisher starts, and serves, while the
broker is away. A request follows ``on_full``: ``block`` waits for room,
``drop_request`` publishes nothing (the usage still settles it),
``reject_cloud`` (default) publishes nothing and tells the gateway not to send
it to a cloud model, whose spend could then not be reserved."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import LeaseTag, RequestEvent, UsageEvent
from budgetflow.schemas.serde import describe_validation_error, dumps
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.gateway.spool import FSYNC_INTERVAL_S, Segment, Spool, SpoolFull
from budgetflow.streams.gateway.usage import Usage
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.clock import Clock
from budgetflow.streams.service.lifecycle import Lifecycle

__all__ = ["BudgetPublisher", "RequestHandle", "SpoolFull"]

log = logging.getLogger(__name__)

OnFull = Literal["block", "drop_request", "reject_cloud"]
T = TypeVar("T")


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
    # Where the request event went on the requests topic, (partition, offset), once the broker acknowledges it;
    # None when it was not recorded. ``BudgetView.admit(..., request=handle)`` counts an admission until then.
    delivery: asyncio.Future[tuple[int, int] | None] | None = field(default=None, compare=False, repr=False)
    usage_delivery: asyncio.Future[tuple[int, int] | None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Item:
    topic: str
    key: bytes
    value: bytes
    segment: Segment | None = None  # a usage event: the spool segment that holds it until acknowledged
    replayed: bool = False
    delivery: asyncio.Future[tuple[int, int] | None] | None = None  # where the event went, once acknowledged

    @property
    def usage(self) -> bool:
        return self.segment is not None


class BudgetPublisher(Lifecycle):
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
        self._spool = Spool(spool_dir or Path(self.settings.data_dir) / "spool", config.spool_max_bytes)
        # Replayed usage takes at most half the buffer, so live traffic keeps room.
        self._replay_slots = asyncio.Semaphore(max(1, self._queue.maxsize // 2))
        self._producer: AIOKafkaProducer | None = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._healthy_at = 0.0
        self._warned_at = -1e9
        self.clock = Clock(self.settings.clock)
        self.counts: dict[str, int] = {
            "requests_published": 0,
            "usage_published": 0,
            "requests_failed": 0,
            "usage_spooled": 0,
            "usage_replayed": 0,
            "requests_dropped": 0,
            "requests_rejected_cloud": 0,
            "requests_blocked": 0,
            "spool_lines_skipped": 0,
            "send_errors": 0,
        }

    # -- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (or, with the broker away, keep trying in the background) and start sending."""
        connected = await self._connect()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="publisher-send"),
            asyncio.create_task(self._replay_loop(), name="publisher-replay"),
            asyncio.create_task(self._spool_loop(), name="publisher-spool"),
        ]
        if not connected:
            self._tasks.append(asyncio.create_task(self._connect_loop(), name="publisher-connect"))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is buffered (up to ``timeout_s``); usage not acknowledged stays in the spool for the next start."""
        if self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            self._resolve(self._queue.get_nowait(), None, delivered=False)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=timeout_s)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout_s)
        await asyncio.to_thread(self._spool.close)

    async def _connect(self) -> bool:
        producer = AIOKafkaProducer(
            **{
                **client_options(self.settings.kafka),
                "request_timeout_ms": self.settings.publisher.delivery_timeout_ms,
            },
            enable_idempotence=True,
            acks="all",
            linger_ms=self.settings.publisher.linger_ms,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            log.warning("publisher cannot reach the broker (%s); usage waits in the spool", exc.__class__.__name__)
            with contextlib.suppress(Exception):
                await producer.stop()
            return False
        except asyncio.CancelledError:  # stopped while connecting: close what was opened
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        self._connected.set()
        return True

    async def _connect_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.publisher.replay_interval_s)
            try:
                if await self._connect():
                    return
            except Exception:
                log.exception("publisher: connecting failed; trying again")

    # -- publishing -----------------------------------------------------------------------
    # Long only by its keyword arguments and the event they fill, one line per field.
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
        lease: LeaseTag | None = None,
    ) -> RequestHandle:
        """Validate and buffer a RequestEvent; raises :class:`InvalidEvent` for a bad one. ``lease``: what
        ``BudgetView.lease`` charged the request to."""
        when = occurred_at or self.clock.now()
        event = _validated(
            RequestEvent,
            {
                "request_id": request_id,
                "attempt": attempt,
                "occurred_at": when,
                "budgets": list(budgets),
                "model": model,
                "provider": provider,
                "backend": backend,
                "session_id": session_id,
                "metadata": dict(metadata or {}),
                "prompt": prompt,
                "messages": list(messages) if messages is not None else None,
                "input_bytes": input_bytes,
                "tools": list(tools) if tools is not None else None,
                "max_tokens": max_tokens,
                "max_completion_tokens": max_completion_tokens,
                "n": n,
                "lease": lease,
            },
        )
        handle = RequestHandle(
            event.request_id,
            event.attempt,
            event.occurred_at,
            tuple(event.budgets),
            event.model,
            event.provider,
            event.backend,
            tuple(sorted(event.metadata.items())),
            delivery=asyncio.get_running_loop().create_future(),
            usage_delivery=asyncio.get_running_loop().create_future(),
        )
        return await self._enqueue_request(
            handle, _Item(self.topics.requests.name, handle.request_id.encode(), dumps(event), delivery=handle.delivery)
        )

    async def _enqueue_request(self, handle: RequestHandle, item: _Item) -> RequestHandle:
        """Buffer a request event; when the buffer is full, ``on_full`` says what becomes of it (and of the call)."""
        if self._queue.full():
            if self.on_full == "drop_request":
                self.counts["requests_dropped"] += 1
                _place(item, None)
                return _replace(handle, accepted=False)
            if self.on_full == "reject_cloud":
                self.counts["requests_rejected_cloud"] += 1
                _place(item, None)
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
        """Validate, write ahead to the spool and buffer the UsageEvent of a request (never dropped).

        Raises :class:`SpoolFull` when the spool cannot take it: the event is not recorded.
        """
        event = _validated(
            UsageEvent,
            {
                "request_id": handle.request_id,
                "attempt": handle.attempt,
                "request_occurred_at": handle.occurred_at,
                "occurred_at": occurred_at or self.clock.now(),
                "budgets": list(handle.budgets),
                "model": model or handle.model,
                "provider": handle.provider,
                "backend": handle.backend,
                "metadata": dict(handle.metadata),
                "request_model": handle.model if model and model != handle.model else None,
                "outcome": outcome,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "cache_write_input_tokens": usage.cache_write_input_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
            },
        )
        topic, key, value = self.topics.usage.name, event.request_id.encode(), dumps(event)
        # Written ahead: from here on a crash of this process cannot lose it.
        segment = self._spool.append(topic, key, value)
        try:
            self._queue.put_nowait(_Item(topic, key, value, segment, delivery=handle.usage_delivery))
        except asyncio.QueueFull:
            self._spool.resolve(segment, delivered=False)  # sent from the spool when there is room
            self.counts["usage_spooled"] += 1

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    def spool_bytes(self) -> int:
        """Bytes of usage in the spool (written ahead, not yet acknowledged and deleted)."""
        return self._spool.size()

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything buffered has been handed to the broker (tests, shutdown)."""
        await asyncio.wait_for(self._queue.join(), timeout_s)
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=timeout_s)

    # -- background -------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        await self._connected.wait()
        assert self._producer is not None
        while True:
            item = await self._queue.get()
            try:
                future = await self._producer.send(item.topic, key=item.key, value=item.value)
            except Exception as exc:  # noqa: BLE001  # the broker is away: the spool keeps the usage
                self._resolve(item, exc, delivered=False)
            else:
                self._in_flight.add(future)
                future.add_done_callback(partial(self._delivered, item=item))
            finally:
                self._queue.task_done()

    def _delivered(self, future: asyncio.Future[Any], item: _Item) -> None:
        self._in_flight.discard(future)
        error = None if future.cancelled() else future.exception()
        delivered = not future.cancelled() and error is None
        self._resolve(item, error, delivered=delivered, metadata=future.result() if delivered else None)

    def _resolve(self, item: _Item, error: BaseException | None, *, delivered: bool, metadata: Any = None) -> None:
        """An item left memory, acknowledged (with the broker's ``metadata``) or not. Never raises: the send loop
        must not die here."""
        try:
            if metadata is not None:
                _place(item, (metadata.partition, metadata.offset))
            if item.replayed:
                self._replay_slots.release()
            if item.segment is not None:
                self._spool.resolve(item.segment, delivered=delivered)
            if delivered:
                self._healthy_at = asyncio.get_running_loop().time()
                self.counts["usage_published" if item.usage else "requests_published"] += 1
            elif item.usage:
                self.counts["usage_spooled"] += 1
                now = asyncio.get_running_loop().time()
                if now - self._warned_at > 10:  # once in a while, not once per event of an outage
                    self._warned_at = now
                    log.warning(
                        "usage not delivered (%s); it waits in the spool (%d so far)",
                        _name(error),
                        self.counts["usage_spooled"],
                    )
            else:
                self.counts["requests_failed"] += 1
            _place(item, None)
        except Exception:
            self.counts["send_errors"] += 1
            log.exception("publisher: could not account for a sent event")

    async def _spool_loop(self) -> None:
        """Group commit: fsync what was written every FSYNC_INTERVAL_S; seal aged segments so acked ones go."""
        while True:
            await asyncio.sleep(FSYNC_INTERVAL_S)
            try:
                self._spool.tick()
                if self._spool.needs_sync():
                    await asyncio.to_thread(self._spool.sync)
            except Exception:
                log.exception("usage spool: sync failed; trying again")

    async def _replay_loop(self) -> None:
        """Send spooled usage again once the broker takes records; segment after segment while it does."""
        await self._connected.wait()
        while True:
            await asyncio.sleep(self.settings.publisher.replay_interval_s)
            while self._may_replay():
                segment = self._spool.next_unsent()
                if segment is None:
                    break
                try:
                    events = await asyncio.to_thread(self._spool.read, segment)
                except OSError:
                    break
                self.counts["spool_lines_skipped"] = self._spool.lines_skipped
                for event in events:
                    await self._replay_slots.acquire()  # at most half the buffer: live traffic keeps room
                    self._spool.hold(segment)
                    await self._queue.put(_Item(*event, segment=segment, replayed=True))
                    self.counts["usage_replayed"] += 1
                # The pass is enqueued: the segment goes once each of its events is acknowledged.
                self._spool.resolve(segment, delivered=True)

    def _may_replay(self) -> bool:
        if self._queue.qsize() > self._queue.maxsize // 2:
            return False
        if asyncio.get_running_loop().time() - self._healthy_at < 30:
            return True
        # Nothing acknowledged lately: probe with the oldest segment when nothing else is in flight.
        return self._queue.qsize() == 0 and not self._in_flight


def _place(item: _Item, position: tuple[int, int] | None) -> None:
    """Tell whoever waits on a request event where it went (None: nowhere); the first answer stands."""
    if item.delivery is not None and not item.delivery.done():
        item.delivery.set_result(position)


def _name(error: BaseException | None) -> str:
    return error.__class__.__name__ if error is not None else "cancelled"


def _validated(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate({k: v for k, v in data.items() if v is not None})  # type: ignore[attr-defined, no-any-return]
    except ValidationError as exc:
        reason, message = describe_validation_error(exc)
        raise InvalidEvent(reason, message) from exc


def _replace(handle: RequestHandle, **changes: Any) -> RequestHandle:
    from dataclasses import replace

    return replace(handle, **changes)
