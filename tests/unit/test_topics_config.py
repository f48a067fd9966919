"""Topic configs that follow from the settings: the state changelog keeps its tombstones as long as the rules look
back."""

from __future__ import annotations

import pytest

from budgetflow.schemas.settings import Settings, TopicSettings
from budgetflow.streams.kafka.topics import Topics, state_delete_retention_ms

DAY_S = 86_400


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("BUDGETFLOW_")]:
        monkeypatch.delenv(key)


def retention(topics: Topics) -> int:
    return int(topics.state.config["delete.retention.ms"])


def test_the_state_changelog_keeps_tombstones_for_ttl_horizon_and_grace() -> None:
    settings = Settings()
    expected = (settings.reservation.ttl_s + settings.dedupe_horizon_s + settings.period_grace_s) * 1000
    assert expected == (3_600 + DAY_S + 7 * DAY_S) * 1000  # 8 days 1 hour, not Kafka's default day
    assert retention(Topics.from_settings(settings)) == expected
    assert state_delete_retention_ms(settings) == expected
    # Topics made from the topic settings alone (names, ACLs) carry the same default.
    assert retention(Topics(TopicSettings())) == expected
    assert Topics.from_settings(settings).state.compacted


def test_the_retention_follows_the_horizon_and_is_never_below_a_day() -> None:
    longer = Settings(dedupe_horizon_s=3 * DAY_S)
    assert retention(Topics.from_settings(longer)) == (3_600 + 3 * DAY_S + 7 * DAY_S) * 1000
    short = Settings(dedupe_horizon_s=60, period_grace_s=0, reservation={"ttl_s": 60})  # type: ignore[arg-type]
    assert retention(Topics.from_settings(short)) == DAY_S * 1000


def test_replicated_topics_refuse_acks_all_writes_that_only_one_replica_holds() -> None:
    """Replication factor 3 (a cluster): every topic has min.insync.replicas=2, so an acknowledged write survives
    its leader; one replica (one broker) leaves the broker's default, as before."""
    three = Topics(TopicSettings(replication_factor=3))
    assert {spec.config["min.insync.replicas"] for spec in three.all()} == {"2"}
    assert all("min.insync.replicas" not in spec.config for spec in Topics(TopicSettings()).all())
    assert {s.config["min.insync.replicas"] for s in Topics(TopicSettings(replication_factor=2)).all()} == {"1"}
    chosen = Topics(TopicSettings(replication_factor=5, min_insync_replicas=3))
    assert {spec.config["min.insync.replicas"] for spec in chosen.all()} == {"3"}


def test_min_insync_replicas_above_the_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="min_insync_replicas above replication_factor"):
        TopicSettings(replication_factor=1, min_insync_replicas=2)


def test_the_environment_chooses_the_replication(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETFLOW_TOPICS__REPLICATION_FACTOR", "3")
    topics = Topics.from_settings(Settings())
    assert topics.replication_factor == 3
    assert topics.ledger.config["min.insync.replicas"] == "2"


def test_topics_with_fewer_replicas_than_the_settings_are_named() -> None:
    """Topics made on one broker stay on one when the cluster grows: each worker start says so, once a topic."""
    from budgetflow.streams.kafka.topics import under_replicated

    lines = under_replicated({"bf.ledger": 1, "bf.usage": 3, "bf.dlq": 2}, 3)
    assert [line.split(" has ")[0] for line in lines] == ["topic bf.dlq", "topic bf.ledger"]
    assert "BUDGETFLOW_TOPICS__REPLICATION_FACTOR is 3" in lines[0]
    assert under_replicated({"bf.ledger": 1}, 1) == []
