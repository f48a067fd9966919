"""aiokafka's repeated errors while a broker is down: one line per message every window, then how many were held."""

from __future__ import annotations

import logging

from budgetflow.streams.service.process import RepeatFilter


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_repeated_aiokafka_error_shows_once_per_window_then_counts_what_was_held() -> None:
    now = [0.0]
    repeats = RepeatFilter(window_s=10.0, clock=lambda: now[0])
    shown = []
    for i in range(300):  # three seconds of a hundred lines a second, with different node ids
        now[0] = i / 100
        record = _record("aiokafka.conn", "Unable connect to node with id %s: %s", i % 3, "refused")
        if repeats.filter(record):
            shown.append(record.getMessage())
    assert shown == ["Unable connect to node with id 0: refused"]
    now[0] = 12.0
    later = _record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "refused")
    assert repeats.filter(later)
    assert later.getMessage() == "Unable connect to node with id 1: refused (and 299 more like it in the last 12 s)"


def test_other_messages_and_budgetflows_own_lines_pass() -> None:
    repeats = RepeatFilter(clock=lambda: 0.0)
    assert repeats.filter(_record("aiokafka.conn", "Unable connect to node with id %s", 1))
    assert repeats.filter(_record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 1))
    for _ in range(3):
        assert repeats.filter(_record("budgetflow.worker", "the broker is away; restarting"))
