"""`budgetflow notify`: each budget transition posted once to a webhook, with retries and dedupe.

It follows ``budgetflow.budget-events`` in its own consumer group. Every event is keyed
``budget:period:event``; the keys already posted are kept in the compacted topic
``budgetflow.notifications``, read back in full at start, so neither a restart nor the aggregate's
re-announcements after a recovery post a transition twice. For each event, in order:

1. skip it if its key was posted;
2. POST it (Slack-compatible JSON: ``text``, plus the event under ``budgetflow``; header
   ``Idempotency-Key: <key>``), retrying connection errors, timeouts, 408, 429 and 5xx with exponential
   backoff up to ``NOTIFY__MAX_BACKOFF_S``, for as long as it takes (a transition is not dropped because a
   webhook is down); any other 4xx is permanent: logged, counted, marked, not retried;
3. write the key to the notifications topic and wait for the broker;
4. commit the event's offset.

A crash between 2 and 3 posts that one transition again on restart (the receiver can dedupe on the
``Idempotency-Key`` header); at every other moment nothing is posted twice or lost. The webhook URL is a
secret: it is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer
from orjson import dumps, loads

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options, group_consumer
from budgetflow.streams.kafka.follow import read_topic
from budgetflow.streams.kafka.retry import Backoff
from budgetflow.streams.kafka.topics import Topics, ensure_topics_now
from budgetflow.streams.service.crash import crash_point

__all__ = ["Notifier", "message_of", "run"]

log = logging.getLogger("budgetflow.notify")

_WORDS = {
    "soft_limit": "passed its soft limit",
    "hard_limit": "reached its monthly limit",
    "normal": "is back under its limits",
    "rollover": "started a new month",
}
_RETRY = {408, 425, 429}


def message_of(event: dict[str, Any]) -> dict[str, Any]:
    """The webhook body: Slack's ``text`` for people, the event itself under ``budgetflow`` for programs."""
    budget, period, name = event.get("budget_id"), event.get("period"), str(event.get("event"))
    words = _WORDS.get(name, f"changed to {name}")
    text = f"Budget {budget} {words} in {period}: ${event.get('spend_usd')} spent (${event.get('settled_usd')} settled)"
    return {"text": text, "budgetflow": event}


class Notifier:
    """One notifier process; several may run in the group (each event goes to one of them)."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        if settings.notify.webhook_url is None:
            raise ConfigError("BUDGETFLOW_NOTIFY__WEBHOOK_URL is not set: where should notifications go?")
        self.settings = settings
        self.topics = topics
        self._url = settings.notify.webhook_url.get_secret_value()
        self.group_id = f"{settings.topics.prefix}notify"
        self.posted: set[bytes] = set()
        self.counts = {"posted": 0, "skipped": 0, "failed": 0, "retries": 0}

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_topics_now(self.settings, self.topics, [self.topics.events, self.topics.notifications])
        for _, key, value, _ in await read_topic(self.settings, self.topics.notifications.name):
            if key is not None and value is not None:
                self.posted.add(key)
        log.info("notifier started (group %s): %d transitions already posted", self.group_id, len(self.posted))
        options = client_options(self.settings.kafka)
        consumer = group_consumer(self.settings.kafka, self.group_id, self.topics.events.name)
        producer = AIOKafkaProducer(**options, enable_idempotence=True, acks="all")
        timeout = aiohttp.ClientTimeout(total=self.settings.notify.timeout_s)
        await consumer.start()
        await producer.start()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not stop.is_set():
                    batch = await consumer.getmany(timeout_ms=500, max_records=100)
                    for tp, records in batch.items():
                        for record in records:
                            if not await self._handle(http, producer, record.key, record.value, stop):
                                return  # stopping mid-retry: the offset stays uncommitted
                            await consumer.commit({tp: record.offset + 1})
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _handle(
        self,
        http: aiohttp.ClientSession,
        producer: AIOKafkaProducer,
        key: bytes | None,
        value: bytes | None,
        stop: asyncio.Event,
    ) -> bool:
        """Post one event unless it was; False when stopped before it was done."""
        if key is None or value is None or key in self.posted:
            self.counts["skipped"] += 1
            return True
        try:
            event = loads(value)
        except ValueError:
            self.counts["skipped"] += 1
            log.warning("budget event %r is not JSON; skipped", key.decode(errors="replace"))
            return True
        crash_point("notify.before_post")
        status = await self._post(http, key.decode(errors="replace"), message_of(event), stop)
        if status is None:
            return False
        crash_point("notify.after_post")
        marker = {"v": 1, "posted_at": datetime.now(UTC).isoformat(), "http_status": status}
        await producer.send_and_wait(self.topics.notifications.name, key=key, value=dumps(marker))
        self.posted.add(key)
        return True

    async def _post(
        self, http: aiohttp.ClientSession, key: str, body: dict[str, Any], stop: asyncio.Event
    ) -> int | None:
        """The final HTTP status (2xx, or a permanent 4xx); None if stopped while retrying."""
        backoff = Backoff(first=0.5, cap=self.settings.notify.max_backoff_s)
        began = time.monotonic()
        while not stop.is_set():
            reason: str
            try:
                async with http.post(self._url, json=body, headers={"Idempotency-Key": key}) as response:
                    await response.read()
                    if response.status < 300:
                        self.counts["posted"] += 1
                        return response.status
                    if 400 <= response.status < 500 and response.status not in _RETRY:
                        self.counts["failed"] += 1
                        log.error("webhook refused %s with HTTP %d; not retried", key, response.status)
                        return response.status
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = exc.__class__.__name__  # not str(exc): it may carry the URL
            self.counts["retries"] += 1
            log.warning(
                "webhook post of %s failed (%s) for %.0f s; retrying in %.1f s",
                key,
                reason,
                time.monotonic() - began,
                backoff.delay,
            )
            await backoff.wait(stop)
        return None


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """The notify role, run until ``stop``."""
    await Notifier(settings, Topics.from_settings(settings)).run(stop)
