"""Synthetic gateway traffic: requests and usages with every awkward case real traffic has.

Used by the integration tests, the benchmarks and the demo. Deterministic for
a seed. Records come in the order a gateway would publish them: usage lags its
request, sometimes overtakes it, sometimes is published twice, a retry is a new
attempt, and a few requests never report usage (their reservations expire).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

__all__ = ["Model", "TrafficRecord", "generate"]


@dataclass(frozen=True)
class Model:
    """A model the traffic calls, and how big its calls are."""

    name: str
    provider: str
    backend: str = "cloud"
    weight: int = 1
    max_input_tokens: int = 4000
    max_output_tokens: int = 800
    caches: bool = False
    reasons: bool = False


@dataclass(frozen=True)
class TrafficRecord:
    """One record to publish: ``requests`` or ``usage``, its key and its event."""

    kind: str
    key: str
    event: dict[str, Any]


def generate(
    n: int,
    *,
    seed: int,
    start: datetime,
    span: timedelta,
    models: Sequence[Model],
    budgets: Sequence[str],
    budget_sets: int = 2,
    special: dict[int, list[str]] | None = None,
    retry_rate: float = 0.05,
    overtake_rate: float = 0.1,
    duplicate_rate: float = 0.05,
    no_usage_rate: float = 0.03,
    words: int = 40,
) -> list[TrafficRecord]:
    """``n`` requests spread over ``span`` from ``start`` (their ``occurred_at``), with their usages.

    ``special`` maps ``i % k`` patterns: ``{50: ["nov:only"]}`` gives every 50th
    request exactly those budgets. Requests that never report usage send
    ``input_bytes`` instead of text.
    """
    rng = random.Random(seed)
    weighted = [m for m in models for _ in range(m.weight)]
    out: list[TrafficRecord] = []
    pending: list[TrafficRecord] = []
    for i in range(n):
        at = start + span * (i / n)
        request_id = f"req-{seed}-{i}"
        chosen = next((b for k, b in (special or {}).items() if i % k == 0), None)
        chosen = chosen if chosen is not None else rng.sample(list(budgets), rng.randint(0, budget_sets))
        for attempt in range(2 if rng.random() < retry_rate else 1):
            model = rng.choice(weighted)
            request: dict[str, Any] = {
                "v": 1,
                "request_id": request_id,
                "attempt": attempt,
                "occurred_at": at.isoformat(),
                "budgets": chosen,
                "model": model.name,
                "provider": model.provider,
                "backend": model.backend,
                "max_tokens": rng.randint(50, 600),
            }
            silent = rng.random() < no_usage_rate
            if silent:
                request["input_bytes"] = rng.randint(100, 5000)
            else:
                request["messages"] = [{"role": "user", "content": f"question {i} " * rng.randint(1, words)}]
            batch = [TrafficRecord("requests", request_id, request)]
            if not silent:
                pin = rng.randint(10, model.max_input_tokens)
                cached = rng.randint(0, pin // 2) if model.caches else 0
                write = rng.randint(0, (pin - cached) // 3) if model.caches else 0
                output = rng.randint(0, model.max_output_tokens)
                usage = {
                    "v": 1,
                    "request_id": request_id,
                    "attempt": attempt,
                    "request_occurred_at": at.isoformat(),
                    "occurred_at": (at + timedelta(seconds=rng.randint(1, 120))).isoformat(),
                    "budgets": chosen,
                    "model": model.name,
                    "provider": model.provider,
                    "backend": model.backend,
                    "outcome": rng.choice(["completed"] * 8 + ["failed", "cancelled"]),
                    "input_tokens": pin,
                    "cached_input_tokens": cached,
                    "cache_write_input_tokens": write,
                    "output_tokens": output,
                    "reasoning_tokens": rng.randint(0, output) if model.reasons else 0,
                }
                record = TrafficRecord("usage", request_id, usage)
                batch = [record, *batch] if rng.random() < overtake_rate else [*batch, record]
            if rng.random() < duplicate_rate:
                batch += batch  # the gateway published twice
            pending.extend(batch)
        if len(pending) > 20:
            # Usage lags a little behind its request, as in real traffic.
            rng.shuffle(pending)
            out.extend(pending[:10])
            pending = pending[10:]
    out.extend(pending)
    return out
