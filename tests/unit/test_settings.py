"""Settings come from BUDGETFLOW_* variables and fail with one line naming the variable."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.settings import Settings, env_name, load_settings, setting_rows


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BUDGETFLOW_"):
            monkeypatch.delenv(name)


def test_defaults_need_no_environment() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.topics.prefix == "budgetflow."
    assert settings.topics.partitions == 8


def test_nested_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("BUDGETFLOW_TOPICS__PARTITIONS", "16")
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__SASL_USERNAME", "gateway")
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD", "hunter2")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "a:1,b:2"
    assert settings.topics.partitions == 16
    password = settings.kafka.security.sasl_password
    assert isinstance(password, SecretStr)
    assert password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS", "no-port", "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS"),
        ("BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS", "host:99999", "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS"),
        ("BUDGETFLOW_TOPICS__PARTITIONS", "0", "BUDGETFLOW_TOPICS__PARTITIONS"),
        ("BUDGETFLOW_TOPICS__PARTITIONS", "eight", "BUDGETFLOW_TOPICS__PARTITIONS"),
        ("BUDGETFLOW_TOPICS__PREFIX", "bad prefix/", "BUDGETFLOW_TOPICS__PREFIX"),
        ("BUDGETFLOW_KAFKA__SECURITY__PROTOCOL", "SASL_SSL", "BUDGETFLOW_KAFKA__SECURITY"),
        ("BUDGETFLOW_KAFKA__SECURITY__SSL_CAFILE", "/nonexistent/ca.pem", "BUDGETFLOW_KAFKA__SECURITY"),
        ("BUDGETFLOW_LOCAL_KAFKA__JVM_GC", "zgc", "BUDGETFLOW_LOCAL_KAFKA__JVM_GC"),
        ("BUDGETFLOW_KAFKA__BOOTSTRAP_SERVER", "typo:1", "unknown setting BUDGETFLOW_KAFKA__BOOTSTRAP_SERVER"),
        ("BUDGETFLOW_PARTITIONS", "8", "unknown setting BUDGETFLOW_PARTITIONS"),
        ("BUDGETFLOW_LITELLM__LOCAL_MODELS", "gpt-4o=llama3.1", "BUDGETFLOW_LITELLM__LOCAL_MODELS: not valid JSON"),
        ("BUDGETFLOW_LITELLM__LOCAL_MODELS", '{"gpt-4o": "gpt-4o"}', "cannot be both cloud and local"),
        ("BUDGETFLOW_LITELLM__UNMETERED_CALLS", "sometimes", "BUDGETFLOW_LITELLM__UNMETERED_CALLS"),
    ],
)
def test_a_bad_setting_fails_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD", "s3cret-value")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "s3cret-value" not in str(info.value)


def test_test_harness_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETFLOW_TEST_BOOTSTRAP", "127.0.0.1:1")
    load_settings()


def test_every_leaf_setting_is_listed_with_a_description() -> None:
    rows = setting_rows()
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names))
    assert "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS" in names
    assert "BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD" in names
    assert all(description for _, _, description in rows), "every setting says what it is for"
    # Each listed name really is read from the environment.
    for name, _, _ in rows:
        assert name.startswith("BUDGETFLOW_")


def test_env_name_maps_nesting() -> None:
    assert env_name(("kafka", "security", "sasl_username")) == "BUDGETFLOW_KAFKA__SECURITY__SASL_USERNAME"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.testing = True  # type: ignore[misc]
