"""Client options carry the security settings to aiokafka."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from budgetflow.schemas.settings import KafkaSettings, SecuritySettings
from budgetflow.streams.kafka.clients import client_options


def test_plaintext_options() -> None:
    options = client_options(KafkaSettings(bootstrap_servers="h:1"))
    assert options["bootstrap_servers"] == "h:1"
    assert options["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in options
    assert "sasl_mechanism" not in options


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            str(out / "ca.key"),
            "-out",
            str(out / "ca.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return out / "ca.pem"


def test_sasl_ssl_options_unwrap_the_secret_only_here(ca_file: Path) -> None:
    kafka = KafkaSettings(
        bootstrap_servers="h:1",
        security=SecuritySettings(
            protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="router",
            sasl_password="pw",  # type: ignore[arg-type]  # pydantic coerces str to SecretStr
            ssl_cafile=ca_file,
            ssl_check_hostname=False,
        ),
    )
    assert "pw" not in repr(kafka)
    options = client_options(kafka)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "router"
    assert options["sasl_plain_password"] == "pw"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].check_hostname is False
