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
