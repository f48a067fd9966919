"""A local cluster's configuration and layout, checked without starting it."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.kafkaconfig import BrokerState, ClusterLayout, server_properties
from budgetflow.streams.dev.localcluster import LocalCluster


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


LAYOUT = ClusterLayout("c" * 22, ((9101, 9201), (9102, 9202), (9103, 9203)))


def test_each_node_names_the_whole_quorum_and_its_own_ports(tmp_path: Path) -> None:
    for node_id in (1, 2, 3):
        state = LAYOUT.state(node_id)
        p = props(server_properties(state, tmp_path, LAYOUT, node_id))
        assert p["node.id"] == str(node_id)
        assert p["controller.quorum.voters"] == "1@127.0.0.1:9201,2@127.0.0.1:9202,3@127.0.0.1:9203"
        assert p["listeners"] == f"PLAINTEXT://127.0.0.1:{9100 + node_id},CONTROLLER://127.0.0.1:{9200 + node_id}"
        assert p["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{9100 + node_id}"
    assert LAYOUT.bootstrap() == "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103"


def test_a_cluster_replicates_its_internal_topics_on_three_with_two_in_sync(tmp_path: Path) -> None:
    p = props(server_properties(LAYOUT.state(2), tmp_path, LAYOUT, 2))
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
        "default.replication.factor",
    ):
        assert p[key] == "3", key
    for key in ("transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr", "min.insync.replicas"):
        assert p[key] == "2", key
    assert p["auto.create.topics.enable"] == "false"
    five = ClusterLayout("c" * 22, tuple((9100 + i, 9200 + i) for i in range(5)))
    assert (five.replication_factor, five.min_insync_replicas) == (3, 2)


def test_one_broker_keeps_its_configuration(tmp_path: Path) -> None:
    """No layout: node 1 alone, one replica of everything, none of the cluster's settings."""
    p = props(server_properties(BrokerState("x" * 22, 1234, 1235), tmp_path))
    assert p["node.id"] == "1"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:1235"
    assert p["offsets.topic.replication.factor"] == "1"
    assert "min.insync.replicas" not in p
    assert "broker.session.timeout.ms" not in p


def test_the_first_start_chooses_distinct_ports_and_keeps_them(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, size=3)
    layout = cluster._ensure_layout()
    ports = [port for pair in layout.ports for port in pair]
    assert len(set(ports)) == 6
    assert LocalCluster(tmp_path)._ensure_layout() == layout, "a later start keeps the cluster's ports and id"
    assert stat.S_IMODE(os.stat(cluster.home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cluster.home / "cluster.json").st_mode) == 0o600
    assert [node.home for node in cluster.nodes] == [cluster.home / f"node-{i}" for i in (1, 2, 3)]
    assert cluster.bootstrap() == layout.bootstrap()


def test_a_cluster_keeps_its_size(tmp_path: Path) -> None:
    LocalCluster(tmp_path, size=3)._ensure_layout()
    with pytest.raises(LocalKafkaError, match="has 3 nodes, not 5"):
        LocalCluster(tmp_path, size=5)._ensure_layout()
    with pytest.raises(LocalKafkaError, match="nodes 1 to 3, not 4"):
        LocalCluster(tmp_path).node(4)


def test_nodes_run_with_the_small_heap(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, LocalKafkaSettings(heap_mb=1024, node_heap_mb=256))
    assert {node.settings.heap_mb for node in cluster.nodes} == {256}
    assert {node.node_id for node in cluster.nodes} == {1, 2, 3}


def test_a_damaged_layout_is_reported(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.home.mkdir(parents=True)
    (cluster.home / "cluster.json").write_text(json.dumps({"cluster_id": "x"}))
    with pytest.raises(LocalKafkaError, match="damaged"):
        cluster.bootstrap()


def test_nothing_runs_before_a_start(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    assert not cluster.exists()
    assert cluster.stop() is False
    with pytest.raises(LocalKafkaError, match="no cluster was ever started"):
        cluster.bootstrap()


def test_a_node_whose_port_was_taken_meanwhile_says_so(tmp_path: Path) -> None:
    """A node keeps the ports of the first start (its peers name them): a taken one is an error, not a new port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        cluster = LocalCluster(tmp_path)
        cluster.home.mkdir(parents=True)
        layout = {"cluster_id": "c" * 22, "ports": [[taken, 1], [2, 3], [4, 5]]}
        (cluster.home / "cluster.json").write_text(json.dumps(layout))
        with pytest.raises(LocalKafkaError, match=f"port {taken} of node 1 is in use"):
            cluster.node(1)._prepare()
