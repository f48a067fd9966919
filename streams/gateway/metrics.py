"""A gateway's metrics: its routing decisions, the view's staleness, the publisher's buffer and spool."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgetflow.streams.service.metrics import PREFIX

if TYPE_CHECKING:
    from budgetflow.streams.gateway.publisher import BudgetPublisher
    from budgetflow.streams.gateway.view import BudgetView

__all__ = ["RouterCollector"]


class RouterCollector(Collector):
    """A gateway's view of budgetflow: decisions, staleness, the publisher's buffer and spool."""

    def __init__(
        self,
        view: BudgetView | None = None,
        publisher: BudgetPublisher | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.view = view
        self.publisher = publisher
        self.now = now or (lambda: datetime.now(UTC))

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        if self.view is not None:
            decisions = CounterMetricFamily(
                f"{PREFIX}_router_decisions", "Routing decisions by outcome.", labels=["outcome"]
            )
            for outcome in ("cloud", "local", "rejected"):
                decisions.add_metric([outcome], self.view.decisions.get(outcome, 0))
            yield decisions
            yield CounterMetricFamily(
                f"{PREFIX}_router_fallbacks",
                "Shifted requests a gateway sent to a cloud fallback because the local model failed.",
                value=self.view.fallbacks_taken,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_router_budgets", "Budgets the view knows.", value=len(self.view.budgets())
            )
            now = self.now()
            stale = sum(1 for b in self.view.budgets() if self.view.status(b, now=now).stale)
            yield GaugeMetricFamily(f"{PREFIX}_router_stale_budgets", "Budgets whose status is stale.", value=stale)
            yield GaugeMetricFamily(
                f"{PREFIX}_router_view_ready", "1 once the view has caught up.", value=1 if self.view.is_ready else 0
            )
            if (book := self.view.lease_book) is not None:
                yield CounterMetricFamily(
                    f"{PREFIX}_router_lease_waits", "Requests that waited for a lease grant.", value=book.waits
                )
                yield CounterMetricFamily(
                    f"{PREFIX}_router_lease_refusals",
                    "Cloud requests refused: no lease covered them within VIEW__LEASE_WAIT_MS.",
                    value=book.refusals,
                )
        if self.publisher is not None:
            events = CounterMetricFamily(
                f"{PREFIX}_publisher_events", "Publisher events by what became of them.", labels=["result"]
            )
            for result, count in sorted(self.publisher.counts.items()):
                events.add_metric([result], count)
            yield events
            yield GaugeMetricFamily(
                f"{PREFIX}_publisher_buffered",
                "Events in the publisher's memory buffer.",
                value=self.publisher.buffered,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_publisher_spool_bytes",
                "Bytes of usage waiting in the spool.",
                value=self.publisher.spool_bytes(),
            )
