"""Hot budgets: which account a sharded budget's entries go to, what a shard sends home, how the home merges it,
and the policy rules around shards (the model-based test, test_shard_model.py, holds the merge exact)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import LeaseTag, LedgerEntry, ShardSum
from budgetflow.schemas.policy import BudgetPolicy, parse_policy_file
from budgetflow.schemas.serde import decode, decode_fast, dumps
from budgetflow.schemas.settings import Settings, TopicSettings
from budgetflow.streams.aggregate.ledger import LedgerConfig, PartitionLedger
from budgetflow.streams.aggregate.statuses import StatusPublisher
from budgetflow.streams.aggregate.store import MemoryStore
from budgetflow.streams.enrich.enricher import Enricher
from budgetflow.streams.kafka.topics import Topics
from budgetflow.streams.rules.scopes import BudgetResolver
from budgetflow.streams.rules.shards import auto_global_shards, global_shards, is_leased
from budgetflow.tokenizers import Estimator, PriceTable, TokenizerRegistry

TOPICS = Topics(TopicSettings())
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
POLICIES = {
    p.id: p
    for p in parse_policy_file(
        {
            "budgets": [
                {"id": "team:hot", "monthly_limit_usd": "1", "hard_limit_action": "block_all", "shards": 4},
                {"id": "team:a", "monthly_limit_usd": "1", "hard_limit_action": "block_all"},
            ]
        }
    ).budgets
}


def enricher(global_shards: int = 1) -> Enricher:
    resolver = BudgetResolver(lambda: POLICIES, global_shards=global_shards)
    return Enricher(Estimator(TokenizerRegistry.default(), PriceTable.default()), TOPICS, resolver=resolver)


def request(request_id: str, **extra: object) -> bytes:
    return dumps(
        {
            "v": 1,
            "request_id": request_id,
            "occurred_at": NOW.isoformat(),
            "budgets": ["team:hot", "team:a"],
            "model": "gpt-4o",
            "provider": "openai",
            "backend": "cloud",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello"}],
            **extra,
        }
    )


def usage(request_id: str) -> bytes:
    return dumps(
        {
            "v": 1,
            "request_id": request_id,
            "request_occurred_at": NOW.isoformat(),
            "occurred_at": NOW.isoformat(),
            "budgets": ["team:hot", "team:a"],
            "model": "gpt-4o",
            "provider": "openai",
            "backend": "cloud",
            "outcome": "completed",
            "input_tokens": 10,
            "output_tokens": 20,
        }
    )


def test_a_sharded_budgets_entries_go_to_the_requests_shard_and_its_reserve_and_settle_meet_there() -> None:
    e = enricher()
    shards = set()
    for i in range(40):
        reserve = e.enrich(TOPICS.requests.name, 0, i, None, request(f"r{i}")).entries
        settle = e.enrich(TOPICS.usage.name, 0, i, None, usage(f"r{i}")).entries
        keys = [key for key, _ in reserve]
        assert keys == [key for key, _ in settle]
        hot, plain, global_ = keys
        assert hot.startswith("team:hot#")
        assert (plain, global_) == ("team:a", "global")
        assert all(decode_fast(LedgerEntry, raw).budget_id == key for key, raw in reserve + settle)
        shards.add(hot)
    assert shards == {f"team:hot#{k}" for k in range(4)}


def test_global_is_sharded_by_the_setting_and_a_large_deployment() -> None:
    keys = [key for key, _ in enricher(global_shards=3).enrich(TOPICS.requests.name, 0, 1, None, request("x")).entries]
    assert keys[-1].startswith("global#")
    assert auto_global_shards(8) == 1
    assert auto_global_shards(23) == 1
    assert auto_global_shards(64) == 8
    assert global_shards(Settings(topics={"partitions": 64})) == 8  # type: ignore[arg-type]
    assert global_shards(Settings(global_shards=2)) == 2


def test_a_lease_tag_rides_only_on_unsharded_budgets() -> None:
    tag = LeaseTag(router="gw1", epochs={"team:hot": 0, "team:a": 0}, pico=5)
    entries = enricher().enrich(TOPICS.requests.name, 0, 1, None, request("x", lease=tag.model_dump())).entries
    leased = {key: decode_fast(LedgerEntry, raw).lease_router for key, raw in entries}
    assert leased["team:a"] == "gw1"
    assert [router for key, router in leased.items() if key.startswith("team:hot#")] == [None]


def test_shards_in_a_policy_file_are_a_whole_number() -> None:
    from budgetflow.schemas.policy import parse_policy_text

    text = "budgets:\n  - id: hot\n    shards: {}\n"
    assert parse_policy_text(text.format(4), source="p.yaml").budgets[0].shards == 4
    with pytest.raises(ConfigError, match=r"p.yaml:3: budgets\[0\].shards: .*whole number of shards"):
        parse_policy_text(text.format("2.5"), source="p.yaml")
    with pytest.raises(ConfigError, match=r"shards: .*less than or equal to 64"):
        parse_policy_text(text.format(65), source="p.yaml")


def test_a_sharded_budget_is_not_leased_and_strict_with_shards_is_refused_in_one_line() -> None:
    assert not POLICIES["team:hot"].leased
    assert POLICIES["team:a"].leased
    blocking_global = BudgetPolicy(id="global", monthly_limit_usd="5", hard_limit_action="block_cloud")  # type: ignore[arg-type]
    assert is_leased(blocking_global, 1)
    assert not is_leased(blocking_global, 2)
    with pytest.raises(ConfigError) as refused:
        parse_policy_file({"budgets": [{"id": "t", "monthly_limit_usd": "1", "strict": True, "shards": 2}]})
    assert "strict needs leases" in str(refused.value)
    assert "\n" not in str(refused.value)


def _ledger(partition: int) -> PartitionLedger:
    return PartitionLedger(partition, MemoryStore(), LedgerConfig(), lambda b: POLICIES.get(b) or BudgetPolicy(id=b))


def _reserve(account: str, request_id: str, pico: int, offset: int) -> LedgerEntry:
    return LedgerEntry(
        entry_id=f"{request_id}:{account}",
        budget_id=account,
        request_id=request_id,
        kind="reserve",
        period="2026-11",
        amount_pico_usd=pico,
        occurred_at=NOW,
        source_partition=0,
        source_offset=offset,
    )


def test_shards_send_their_sums_home_and_only_the_home_has_a_status() -> None:
    shards, home = [_ledger(1), _ledger(2)], _ledger(0)
    for offset, (k, pico) in enumerate([(0, 3 * 10**11), (1, 4 * 10**11), (0, 2 * 10**11)]):
        shards[k].apply(_reserve(f"team:hot#{k}", f"r{offset}", pico, offset), offset)
    partials = []
    for shard in shards:
        changes, touched, _ = shard.take_outputs()
        assert changes == []
        assert touched == set()
        assert list(shard.budgets()) == []
        partials += shard.take_partials()
        assert shard.take_partials() == []  # sent once per change
    assert [home for home, _ in partials] == ["team:hot", "team:hot"]
    for offset, (_, raw) in enumerate(partials * 2):  # each delivered twice: the second changes nothing
        result = home.apply(decode(LedgerEntry, raw)[0], offset)
        assert result == ("applied" if offset < 2 else "duplicate")
    merged = home.period_state("team:hot", "2026-11")
    assert merged is not None
    assert (merged.reserved, merged.requests, merged.status) == (9 * 10**11, 3, "soft_limit")
    assert merged.covers == {0: 1}  # the lowest of the shards' (shard 0 counted offsets 0 and 2, shard 1 offset 1)
    changes, touched, _ = home.take_outputs()
    assert [(c.budget, c.event) for c in changes] == [("team:hot", "soft_limit")]
    publisher = StatusPublisher(LedgerConfig().rules, lambda b: POLICIES[b], lambda: NOW, 60)
    (status,) = [o for o in publisher.after_batch(home, changes, touched, None) if o.role == "status"]
    assert status.key == b"team:hot"
    assert b'"spend_usd":"0.900000000000"' in status.value


def test_an_older_partial_never_replaces_a_newer_one() -> None:
    home = _ledger(0)

    def partial(version: int, reserved: int, offset: int) -> str:
        part = ShardSum(shard=0, version=version, settled=0, reserved=reserved, covers={0: version})
        entry = LedgerEntry(
            entry_id=f"p{version}",
            budget_id="team:hot",
            request_id="team:hot#0",
            kind="partial",
            period="2026-11",
            amount_pico_usd=0,
            occurred_at=NOW,
            shard_sum=part,
        )
        return home.apply(entry, offset)

    assert partial(7, 500, 0) == "applied"
    assert partial(3, 100, 1) == "duplicate"  # from a worker that lost the partition and did not know it yet
    merged = home.period_state("team:hot", "2026-11")
    assert merged is not None
    assert merged.reserved == 500
