"""Regression tests of the hardening issue's defects that need no broker: each failed before its fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from budgetflow.schemas.errors import InvalidEvent
from budgetflow.schemas.events import MAX_TOKENS, LedgerEntry, RequestEvent, entry_id
from budgetflow.schemas.money import MAX_ENTRY_PICO, MAX_PERIOD_PICO, PICO_PER_USD
from budgetflow.schemas.policy import BudgetPolicy
from budgetflow.schemas.serde import decode, decode_fast, dumps
from budgetflow.schemas.settings import PricingSettings, ReservationSettings, TopicSettings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.records import PeriodState
from budgetflow.streams.aggregate.statuses import StatusPublisher
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.enrich.enricher import Enricher
from budgetflow.streams.kafka.dlq import MAX_KEY_BYTES, MAX_VALUE_BYTES, DeadLetter, redact
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.policies import _absorb
from budgetflow.streams.rules.status import StatusRules
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry

T0 = datetime(2026, 11, 10, 12, tzinfo=UTC)
TOPICS = Topics(TopicSettings())
ENRICHER = Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default()), TOPICS)
LIMITED = {"team:x": BudgetPolicy(id="team:x", monthly_limit_usd="100.00")}  # type: ignore[arg-type]


def policy_for(budget: str) -> BudgetPolicy:
    return LIMITED.get(budget) or BudgetPolicy(id=budget)


def entry(kind: str, request: str, amount: int, *, at: datetime = T0, budget: str = "team:x", **kw: Any) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id(request, 0, kind, budget),
        budget_id=None if kind == "tick" else budget,
        request_id=request,
        kind=kind,
        period=f"{at.year:04d}-{at.month:02d}",  # type: ignore[arg-type]
        amount_pico_usd=amount,
        occurred_at=at,
        **kw,
    )


def tick(at: datetime) -> LedgerEntry:
    return entry("tick", "tick", 0, at=at, expire=True)


def ledger_of(store: MemoryStore | None = None, **config: Any) -> PartitionLedger:
    return PartitionLedger(0, store or MemoryStore(), LedgerConfig(**config), policy_for)


def apply_all(ledger: PartitionLedger, entries: list[LedgerEntry], start: int = 0, **kw: Any) -> list[str]:
    outcomes = [ledger.apply(e, offset, **kw) for offset, e in enumerate(entries, start=start)]
    ledger.store.write(dict(ledger.drain()), checkpoint=start + len(entries) - 1)
    return outcomes


# -- 1. a credit larger than the month's spend -------------------------------------------------------------------
def test_a_credit_past_the_spend_makes_a_negative_month_and_its_status_still_builds() -> None:
    ledger = ledger_of()
    apply_all(
        ledger, [entry("adjust", "adjust:a", 10 * PICO_PER_USD), entry("adjust", "adjust:b", -120 * PICO_PER_USD)]
    )
    publisher = StatusPublisher(StatusRules(), policy_for, lambda: T0, refresh_s=60)
    (out,) = publisher.refresh(ledger, ["team:x"])
    status = orjson.loads(out.value)
    assert status["spend_usd"] == "-110.000000000000"  # exact, negative
    assert status["utilization_percent"] == 0.0  # clamped: a credit does not make utilization negative
    assert status["remaining_usd"] == "210.000000000000"
    # and a restart rebuilds the same from the store
    assert ledger_of(ledger.store).periods[("team:x", "2026-11")].spend == -110 * PICO_PER_USD


# -- 2 and 15. dead letters always fit; redaction keeps only known-safe fields -------------------------------------
def test_a_dead_letter_of_a_megabyte_record_fits_in_one_produce_request() -> None:
    huge = b'{"request_id": "' + b"x" * 1_048_000 + b'"}'
    letter = DeadLetter("enrich", "invalid", "m" * 5000, "usage", 0, 7, b"k" * 100_000, huge)
    size = len(letter.value) + len(letter.key or b"") + sum(len(k) + len(v) for k, v in letter.headers())
    assert size < 100_000 < 1_048_576
    assert len(letter.value) <= MAX_VALUE_BYTES
    assert len(letter.key or b"") <= MAX_KEY_BYTES
    assert orjson.loads(letter.value)["length"] == len(huge)


def test_redaction_keeps_known_safe_fields_and_nothing_else() -> None:
    raw = dumps(
        {
            "v": 1,
            "request_id": "r-1",
            "model": "gpt-4o",
            "input": "a Responses-API prompt",
            "instructions": "secret system prompt",
            "messages": [{"role": "user", "content": "hi secret"}],
            "metadata": {"team": "search"},
            "max_tokens": 10,
            "budgets": ["team:a"],
            "extra": {"deep": ["secret in a list"]},
            "model_long": "s" * 300,
        }
    )
    out = orjson.loads(redact(raw))
    assert b"secret" not in redact(raw)
    assert b"Responses-API" not in redact(raw)
    assert out["request_id"] == "r-1"
    assert out["model"] == "gpt-4o"
    assert out["max_tokens"] == 10
    assert out["metadata"] == {"team": "search"}
    assert out["budgets"] == ["team:a"]
    assert out["input"]["redacted"] is True
    assert out["input"]["length"] == len("a Responses-API prompt")
    # a known field that is not what it should be (a long string) is redacted too
    assert redact(dumps({"model": "p" * 1000})) != dumps({"model": "p" * 1000})


def test_enrich_redacts_usage_dead_letters_too() -> None:
    bad = dumps({"v": 1, "request_id": "r", "input": "the prompt text", "outcome": "nope"})
    result = ENRICHER.enrich(TOPICS.usage.name, 0, 1, b"r", bad)
    assert result.dead is not None
    assert b"prompt text" not in result.dead.value


# -- 3. a non-JSON record on the policies topic ------------------------------------------------------------------
def test_a_non_json_policy_record_is_skipped_and_counted() -> None:
    policies: dict[str, BudgetPolicy] = {"team:x": LIMITED["team:x"]}
    skipped: list[int] = []
    assert _absorb(policies, b"team:x", b"\xff not json {", lambda: skipped.append(1)) is None
    assert _absorb(policies, b"team:x", b"[1, 2]", lambda: skipped.append(1)) is None
    assert policies == {"team:x": LIMITED["team:x"]}
    assert len(skipped) == 2


# -- 4. money past 2^64 pico-dollars; the fallback price's reservation cap ----------------------------------------
def test_a_period_past_64_bits_encodes_and_the_bound_refuses_what_passes_it() -> None:
    big = PeriodState("global", "2026-11", settled=30 * 10**18, reserved=2**64 + 5)
    assert PeriodState.decode("global", "2026-11", big.encode()) == big
    ledger = ledger_of()
    entries = [entry("settle", f"r{i}", MAX_ENTRY_PICO, budget="global") for i in range(25)]
    assert apply_all(ledger, entries) == ["applied"] * 25  # $25 M in one month: past 2^64 pico-dollars
    recovered = ledger_of(ledger.store)
    assert recovered.periods[("global", "2026-11")].settled == 25 * MAX_ENTRY_PICO
    small = ledger_of(max_period_pico=3 * MAX_ENTRY_PICO)
    outcomes = apply_all(small, [entry("settle", f"r{i}", MAX_ENTRY_PICO, budget="global") for i in range(4)])
    assert outcomes == ["applied", "applied", "applied", "out_of_range"]
    assert small.periods[("global", "2026-11")].settled == 3 * MAX_ENTRY_PICO
    assert MAX_PERIOD_PICO > 2**64


def test_entries_past_the_bound_of_one_entry_are_out_of_range() -> None:
    raw = dumps({**entry("adjust", "adjust:a", 1).model_dump(mode="json"), "amount_pico_usd": MAX_ENTRY_PICO + 1})
    with pytest.raises(InvalidEvent) as info:
        decode_fast(LedgerEntry, raw)
    assert info.value.reason == "out_of_range"


def test_an_unpriced_model_asking_for_a_billion_tokens_reserves_at_most_the_cap() -> None:
    result = ENRICHER.enrich(
        TOPICS.requests.name,
        0,
        1,
        b"r",
        dumps(
            {
                "v": 1,
                "request_id": "r",
                "occurred_at": T0.isoformat(),
                "model": "no-such-model",
                "provider": "acme",
                "backend": "cloud",
                "max_tokens": MAX_TOKENS,
                "n": 128,
                "prompt": "hi",
            }
        ),
    )
    assert result.dead is None
    for _, raw in result.entries:
        reserve = decode_fast(LedgerEntry, raw)  # a valid entry: nothing accepted here is dropped downstream
        assert not reserve.priced
        assert reserve.amount_pico_usd == 10 * PICO_PER_USD  # RESERVATION__MAX_UNPRICED_USD
        assert reserve.output_tokens == MAX_TOKENS
    with pytest.raises(ValueError, match="at most 1000000"):
        ReservationSettings(max_unpriced_usd="2000000")


def test_a_settle_costing_more_than_one_entry_holds_is_out_of_range_in_enrich() -> None:
    usage = {
        "v": 1,
        "request_id": "r",
        "request_occurred_at": T0.isoformat(),
        "occurred_at": T0.isoformat(),
        "model": "x",
        "provider": "router",
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": 1,
        "output_tokens": 1,
        "reported_cost_usd": "2000000.00",
    }
    pricing = PricingSettings(trust_reported_cost=["router"])
    enricher = Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default(), pricing=pricing), TOPICS)
    result = enricher.enrich(TOPICS.usage.name, 0, 1, b"r", dumps(usage))
    assert result.dead is not None
    assert result.dead.reason == "out_of_range"
    assert not result.entries


# -- 7. a reserve and its settle with different TTLs -------------------------------------------------------------
def test_a_settle_with_a_longer_ttl_than_its_swept_reserve_is_late_not_counted_twice() -> None:
    ledger = ledger_of(horizon_s=3600, sweep_interval_s=1)
    apply_all(ledger, [entry("reserve", "r1", 5, ttl_s=60), tick(T0 + timedelta(seconds=120))])
    # Past the reserve's TTL + horizon: the sweep forgets the request...
    apply_all(ledger, [tick(T0 + timedelta(seconds=60 + 3600 + 30))], start=2)
    apply_all(ledger, [tick(T0 + timedelta(seconds=60 + 3600 + 40))], start=3)
    assert ledger.store.get(b"r|team:x\x1fr1\x1f0") is None
    # ...and a settle priced with a one-hour TTL arrives: within its own TTL + horizon, but not the request's.
    (outcome,) = apply_all(ledger, [entry("settle", "r1", 7, ttl_s=3600)], start=4)
    assert outcome == "late_horizon"
    assert ledger.periods[("team:x", "2026-11")].settled == 5  # the expired estimate, once


def test_the_late_check_uses_the_ttl_stored_with_the_request() -> None:
    ledger = ledger_of(horizon_s=3600)
    apply_all(ledger, [entry("reserve", "r1", 5, ttl_s=3600), tick(T0 + timedelta(seconds=3600 + 3600 - 10))])
    # The settle says 60 s, the reservation was made with an hour: it is on time by the stored TTL.
    (outcome,) = apply_all(ledger, [entry("settle", "r1", 7, ttl_s=60)], start=2)
    assert outcome == "applied"
    assert ledger.periods[("team:x", "2026-11")].settled == 7


# -- 8. ticks from a clock far ahead -----------------------------------------------------------------------------
def test_a_tick_from_a_clock_forty_days_ahead_moves_stream_time_only_as_far_as_the_broker_vouches() -> None:
    ledger = ledger_of()
    broker = T0.timestamp()
    apply_all(ledger, [entry("reserve", "r1", 5, ttl_s=3600), tick(T0 + timedelta(days=40))], max_time=broker + 300)
    assert ledger.meta.stream_time == broker + 300
    assert ledger.open_reservations == 1  # not expired by a tick from the future
    (outcome,) = apply_all(ledger, [entry("settle", "r2", 9)], start=2, max_time=broker + 300)
    assert outcome == "applied"  # a genuine entry is not late


# -- 9. one bound for input size and tokens ----------------------------------------------------------------------
def test_input_bytes_past_the_token_bound_are_refused_at_the_door_and_the_bound_itself_makes_a_valid_entry() -> None:
    base = {
        "v": 1,
        "request_id": "r",
        "occurred_at": T0.isoformat(),
        "model": "gpt-4o",
        "provider": "openai",
        "backend": "cloud",
    }
    with pytest.raises(InvalidEvent) as info:
        decode(RequestEvent, dumps({**base, "input_bytes": 1 << 40}))
    assert info.value.reason == "out_of_range"
    result = ENRICHER.enrich(TOPICS.requests.name, 0, 1, b"r", dumps({**base, "input_bytes": MAX_TOKENS}))
    assert result.dead is None
    assert result.entries
    for _, raw in result.entries:
        assert decode_fast(LedgerEntry, raw).input_tokens <= MAX_TOKENS


# -- what a hostile review found after the first fixes ------------------------------------------------------------
def test_every_field_at_its_longest_makes_entries_the_aggregate_accepts() -> None:
    long = "p" * 256
    budgets = [f"b{i:02d}" + "x" * 125 for i in range(63)]
    pricing = PricingSettings(trust_reported_cost=[long])
    enricher = Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default(), pricing=pricing), TOPICS)
    request = {
        "v": 1,
        "request_id": "r" * 256,
        "attempt": 10_000,
        "occurred_at": T0.isoformat(),
        "budgets": budgets,
        "model": "m" * 256,
        "provider": long,
        "backend": "cloud",
        "prompt": "hi",
    }
    usage = {
        "v": 1,
        "request_id": "r" * 256,
        "attempt": 10_000,
        "request_occurred_at": T0.isoformat(),
        "occurred_at": T0.isoformat(),
        "budgets": budgets,
        "model": "m" * 256,
        "provider": long,
        "request_model": "q" * 256,
        "backend": "cloud",
        "outcome": "completed",
        "input_tokens": MAX_TOKENS,
        "output_tokens": MAX_TOKENS,
        "reported_cost_usd": "1.00",
    }
    for topic, event in ((TOPICS.requests.name, request), (TOPICS.usage.name, usage)):
        result = enricher.enrich(topic, 0, 1, b"r", dumps(event))
        assert result.dead is None
        assert len(result.entries) == 64
        for _, raw in result.entries:
            decode_fast(LedgerEntry, raw)  # the aggregate takes what enrich took


def test_a_refusal_is_refused_again_on_replay_after_a_crash_that_kept_its_period() -> None:
    def e(kind: str, request: str, amount: int) -> LedgerEntry:
        return entry(kind, request, amount)

    log = [e("reserve", "A", 60), e("reserve", "B", 50), e("settle", "A", 10), e("settle", "B", 20)]
    store = MemoryStore()
    ledger = ledger_of(store, max_period_pico=100)
    apply_all(ledger, log[:1])
    assert [ledger.apply(log[i], i) for i in (1, 2)] == ["out_of_range", "applied"]
    changes = ledger.drain()
    store.write(dict(changes[:1]), checkpoint=2)  # the period record is durable, nothing else: kill -9
    recovered = ledger_of(store, max_period_pico=100)
    assert [recovered.apply(log[i], i) for i in (1, 2)] == ["out_of_range", "applied"]
    recovered.store.write(dict(recovered.drain()), checkpoint=2)
    apply_all(recovered, log[3:], start=3)
    period = recovered.periods[("team:x", "2026-11")]
    assert (period.settled, period.reserved) == (30, 0)  # as without the crash (B's settle counts on its own)


async def test_a_dead_letter_is_replaced_by_its_digest_only_when_the_broker_refuses_the_record_itself() -> None:
    import asyncio

    from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, TopicAuthorizationFailedError

    from budgetflow.streams.kafka.dlq import send_dead_letter

    class Producer:
        def __init__(self, error: type[Exception]) -> None:
            self.error, self.sent = error, []

        async def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> Any:
            future = asyncio.get_running_loop().create_future()
            if not self.sent:
                future.set_exception(self.error())
            else:
                future.set_result("ok")
            self.sent.append(value)
            return future

    letter = DeadLetter("aggregate", "late", "m", "ledger", 0, 7, b"team:x", b'{"amount_pico_usd": 70}')
    refused = Producer(MessageSizeTooLargeError)
    assert await (await send_dead_letter(refused, "dlq", letter)) == "ok"
    assert orjson.loads(refused.sent[1])["redacted"] is True
    for error in (TopicAuthorizationFailedError, KafkaTimeoutError):  # the deployment's fault: the batch must fail
        with pytest.raises(error):
            await (await send_dead_letter(Producer(error), "dlq", letter))


def test_redaction_digests_text_put_in_safe_fields_label_keys_and_nested_keys() -> None:
    raw = dumps(
        {
            "v": 1,
            "model": "the secret plan",
            "budgets": ["the secret plan"],
            "session_id": "secret-session",
            "metadata": {"the secret plan": "x", "team": "the secret plan"},
            "messages": [{"the secret plan": 1}],
        }
    )
    out = redact(raw)
    assert b"secret" not in out
    with pytest.raises(InvalidEvent) as info:
        decode(
            RequestEvent,
            dumps(
                {
                    "v": 1,
                    "request_id": "r",
                    "occurred_at": T0.isoformat(),
                    "model": "m",
                    "provider": "p",
                    "backend": "cloud",
                    "prompt": "x",
                    "metadata": {"the secret plan": "x"},
                }
            ),
        )
    assert "secret" not in str(info.value)


def test_a_policy_record_whose_key_is_not_its_id_is_skipped() -> None:
    policies: dict[str, BudgetPolicy] = {}
    skipped: list[int] = []
    raw = dumps(LIMITED["team:x"].model_dump(mode="json"))
    assert _absorb(policies, b"team:other", raw, lambda: skipped.append(1)) is None
    assert policies == {}
    assert skipped == [1]


def test_a_passing_broker_error_while_checking_topics_is_retried_not_a_configuration_error() -> None:
    from aiokafka.errors import UnknownTopicOrPartitionError

    from budgetflow.streams.kafka.topics import _retriable

    with pytest.raises(UnknownTopicOrPartitionError):  # a topic created a moment ago: the worker backs off
        _retriable(3, "not yet")
    _retriable(29, "topic authorization failed")  # not one that passes: the caller reports a ConfigError
