"""The Faust app of `budgetflow bench --only faust`: the aggregate's sums written the natural Faust way.

Never imported by budgetflow: the bench runs this file by its path with the interpreter of a venv of its own
(faust-streaming pins an older croniter than budgetflow's dev tools), so it imports only Faust and the standard
library. Configured by environment variables (``FAUST_BENCH_*``, set by :mod:`budgetflow.streams.dev.bench_faust`).

One agent reads the ledger topic (event by event, or with ``FAUST_BENCH_TAKE`` in ``stream.take`` batches); two
tables hold its state, each written once per entry:

* ``requests``: per ``budget|request|attempt``, the reserve and the settle seen (``[est, act]``) — the dedupe, and
  what a settle needs to release its reservation;
* ``spend``: per ``budget|period``, ``[settled, reserved, settles]`` in pico-dollars.

A reserve adds its amount to ``reserved``; a settle adds its amount to ``settled`` and takes the reservation back
out of ``reserved`` (a settle that comes first absorbs the later reserve), as
:class:`budgetflow.streams.aggregate.ledger.PartitionLedger` counts them. A duplicate entry changes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import faust

_env = os.environ
PARTITIONS = int(_env.get("FAUST_BENCH_PARTITIONS", "8"))
TARGET = int(_env.get("FAUST_BENCH_TARGET", "0"))  # entries after which the time is taken (0: never)
PROGRESS = Path(_env.get("FAUST_BENCH_PROGRESS", "faust-progress.json"))
TAKE = int(_env.get("FAUST_BENCH_TAKE", "0"))  # more than 0: the agent reads stream.take(TAKE) batches

app = faust.App(
    _env.get("FAUST_BENCH_APP_ID", "budgetflow-faust-bench"),
    broker="kafka://" + _env.get("FAUST_BENCH_BROKER", "127.0.0.1:9092"),
    store="memory://",  # the tables live in the changelogs: a restart reads them back
    datadir=_env.get("FAUST_BENCH_DATADIR", "faust-data"),
    topic_partitions=PARTITIONS,
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    # The session timeouts of budgetflow's workers: a killed worker's partitions move as soon in both.
    broker_session_timeout=10.0,
    broker_heartbeat_interval=3.0,
)
ledger = app.topic(_env.get("FAUST_BENCH_TOPIC", "ledger"), key_type=bytes, value_serializer="raw")
requests = app.Table("requests", default=None, partitions=PARTITIONS)
spend = app.Table("spend", default=None, partitions=PARTITIONS)

_progress: dict[str, Any] = {"processed": 0, "first_at": None, "target_at": None, "pid": os.getpid()}


def apply(entry: dict[str, Any]) -> bool:
    """Count one ledger entry into the two tables; False for a kind the bench does not write (an aggregate's
    tick on a topic it read too)."""
    kind = entry["kind"]
    if kind not in ("reserve", "settle"):
        return False
    budget, amount = entry["budget_id"], entry["amount_pico_usd"]
    key = f"{budget}|{entry['request_id']}|{entry.get('attempt', 0)}"
    est, act = requests.get(key) or (None, None)
    sums_key = f"{budget}|{entry['period']}"
    settled, reserved, settles = spend.get(sums_key) or (0, 0, 0)
    if kind == "reserve":
        if est is not None:
            return True  # a duplicate
        est = amount
        if act is None:
            reserved += amount
    else:
        if act is not None:
            return True  # a duplicate
        act = amount
        settled += amount
        settles += 1
        if est is not None:
            reserved -= est
    requests[key] = (est, act)
    spend[sums_key] = (settled, reserved, settles)
    return True


def _count(value: bytes) -> None:
    if _progress["first_at"] is None:
        _progress["first_at"] = time.perf_counter()
    if not apply(json.loads(value)):
        return
    _progress["processed"] += 1
    if _progress["processed"] == TARGET:
        _progress["target_at"] = time.perf_counter()
        _write_progress()


if TAKE:  # batches, as a Faust agent reads fast: the table writes then run between two events of the stream

    @app.agent(ledger)
    async def aggregate_batches(stream: Any) -> None:
        async for values in stream.take(TAKE, within=1.0):
            for value in values:
                _count(value)

else:  # the natural form: one event at a time

    @app.agent(ledger)
    async def aggregate(stream: Any) -> None:
        async for value in stream:
            _count(value)


@app.timer(0.25)
async def report() -> None:
    _write_progress()


def _write_progress() -> None:
    """The counts so far, for the bench (replaced whole, so that a reader never sees half a file)."""
    partial = PROGRESS.with_suffix(".tmp")
    partial.write_text(json.dumps(_progress))
    partial.replace(PROGRESS)


if __name__ == "__main__":
    app.main()
