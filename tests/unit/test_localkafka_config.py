"""The local broker's configuration, checked without starting it."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.kafkaconfig import BrokerState, new_cluster_id, server_properties
from budgetflow.streams.dev.localkafka import LocalKafka, free_port


def test_cluster_ids_are_16_bytes_of_urlsafe_base64() -> None:
    for _ in range(200):
        cid = new_cluster_id()
        assert len(cid) == 22
        assert not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_server_properties_are_safe_for_tests(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, LocalKafkaSettings(port=0))
    text = server_properties(BrokerState("x" * 22, 1234, 1235), broker.log_dir)
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["auto.create.topics.enable"] == "false"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:1235"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1234"
    assert int(props["group.min.session.timeout.ms"]) <= 3000
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert props[key] == "1"


def test_a_taken_port_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        broker = LocalKafka(tmp_path, LocalKafkaSettings(port=port))
        with pytest.raises(LocalKafkaError, match=f"port {port} is in use"):
            broker._prepare()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_damaged_state_file_is_reported(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path)
    broker.home.mkdir(parents=True)
    (broker.home / "state.json").write_text("{not json")
    with pytest.raises(LocalKafkaError, match="damaged"):
        broker.bootstrap()
