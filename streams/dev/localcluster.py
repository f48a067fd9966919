"""A real Apache Kafka cluster on 127.0.0.1: N KRaft nodes (three by default), each a broker and a controller.

``budgetflow kafka start --brokers 3`` runs it for development and for the fault tests: the same Maven jars as
the single broker, one cluster id, a controller quorum of every node (static ``controller.quorum.voters``), the
internal topics on three replicas with ``min.insync.replicas=2``, so a node can be SIGKILLed and restarted while
clients keep writing with ``acks=all``.

Each node is a :class:`~budgetflow.streams.dev.localkafka.LocalKafka` in its own dir, ``<data dir>/kafka-cluster/
node-<id>``, with a small heap (``LOCAL_KAFKA__NODE_HEAP_MB``); ``cluster.json`` beside them keeps the cluster id
and every node's ports, chosen free at the first start and kept: every node names every controller, so one
cannot move alone. The data dir is private as the single broker's is.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.kafkaconfig import BrokerState, ClusterLayout, new_cluster_id, server_properties
from budgetflow.streams.dev.localhost import free_port, locked, port_open, send_signal
from budgetflow.streams.dev.localkafka import LocalKafka
from budgetflow.streams.dev.securekafka import write_private

__all__ = ["DEFAULT_SIZE", "ClusterNode", "LocalCluster"]

DEFAULT_SIZE = 3


class ClusterNode(LocalKafka):
    """One node of a :class:`LocalCluster`: a LocalKafka whose configuration names the whole quorum."""

    def __init__(self, cluster: LocalCluster, node_id: int) -> None:
        settings = cluster.settings.model_copy(update={"heap_mb": cluster.settings.node_heap_mb})
        super().__init__(cluster.home, settings, subdir=f"node-{node_id}")
        self.node_id = node_id
        self._cluster = cluster

    def launch(self) -> tuple[BrokerState, int | None, bool]:
        """Spawn the node unless it runs, without waiting: it answers only once a quorum of its peers runs."""
        with self._lock():
            return self._launch()

    def settle(self, state: BrokerState, pid: int | None, *, spawned: bool) -> None:
        """Wait until the launched node has registered with the controllers (or kill it if it does not)."""
        self._settle(state, pid, spawned=spawned)

    def _prepare(self) -> BrokerState:
        layout = self._cluster.layout()
        if layout is None:
            raise LocalKafkaError(f"no cluster was ever started in {self._cluster.home}")
        state = layout.state(self.node_id)
        for port in (state.port, state.controller_port):
            if port_open(port):
                raise LocalKafkaError(
                    f"port {port} of node {self.node_id} is in use by another program; a cluster keeps the ports "
                    f"of its first start (remove {self._cluster.home} to choose new ones)"
                )
        self._install(state, server_properties(state, self.log_dir, layout, self.node_id), None)
        return state


class LocalCluster:
    """``size`` nodes under ``<data_dir>/kafka-cluster``: ``start`` is idempotent, ``stop`` is controlled, and one
    node can be killed (``kill``, a SIGKILL) and started again (``start_node``) while the others run."""

    def __init__(self, data_dir: Path, settings: LocalKafkaSettings | None = None, *, size: int | None = None) -> None:
        if size is not None and size < 1:
            raise LocalKafkaError(f"a cluster needs at least one node, not {size}")
        self.settings = settings or LocalKafkaSettings()
        self.home = Path(data_dir).resolve() / "kafka-cluster"
        self._size = size

    @property
    def _layout_file(self) -> Path:
        return self.home / "cluster.json"

    # -- queries -------------------------------------------------------------
    def exists(self) -> bool:
        """True once a cluster was started in this data dir."""
        return self._layout_file.exists()

    def layout(self) -> ClusterLayout | None:
        """The cluster's id and ports (None before its first start)."""
        try:
            raw = json.loads(self._layout_file.read_text())
            return ClusterLayout(str(raw["cluster_id"]), tuple((int(p), int(c)) for p, c in raw["ports"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalKafkaError(f"{self._layout_file} is damaged ({exc}); remove {self.home} to start anew") from exc

    @property
    def size(self) -> int:
        layout = self.layout()
        return layout.size if layout else self._size or DEFAULT_SIZE

    @property
    def nodes(self) -> list[ClusterNode]:
        return [ClusterNode(self, node_id) for node_id in range(1, self.size + 1)]

    def node(self, node_id: int) -> ClusterNode:
        if not 1 <= node_id <= self.size:
            raise LocalKafkaError(f"the cluster has nodes 1 to {self.size}, not {node_id}")
        return ClusterNode(self, node_id)

    def pids(self) -> dict[int, int | None]:
        """Each node's pid, None for a node that does not run."""
        return {node.node_id: node.pid() for node in self.nodes}

    def bootstrap(self) -> str:
        """Every node's client address, comma-separated (valid once the cluster has been started here)."""
        layout = self.layout()
        if layout is None:
            raise LocalKafkaError(f"no cluster was ever started in {self.home}")
        return layout.bootstrap()

    def quorum_leader(self, timeout_s: float = 30.0) -> int | None:
        """The node that leads the controller quorum now (the active controller), as Kafka's own
        ``kafka-metadata-quorum describe --status`` says; None when no running node answers.

        aiokafka has no DescribeQuorum, and a KRaft broker's metadata names a random broker as "controller", so the
        tool from the same jars asks (a short-lived JVM, about 1.5 s).
        """
        first, pids = self.nodes[0], self.pids()
        running = [f"127.0.0.1:{port}" for node_id, (port, _) in enumerate(self._ports(), 1) if pids[node_id]]
        if not running:
            return None
        cmd = [
            first._java(),  # the nodes' own java, from the same class
            "-Xmx128m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={first.home / 'log4j2.properties'}",
            "-cp",
            f"{first.jars.lib}/*",
            "org.apache.kafka.tools.MetadataQuorumCommand",
            "--bootstrap-server",
            ",".join(running),
            "describe",
            "--status",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        found = re.search(r"^LeaderId:\s*(-?\d+)", proc.stdout, re.MULTILINE)
        leader = int(found.group(1)) if proc.returncode == 0 and found else -1
        return leader if leader > 0 else None

    def _ports(self) -> tuple[tuple[int, int], ...]:
        layout = self.layout()
        if layout is None:
            raise LocalKafkaError(f"no cluster was ever started in {self.home}")
        return layout.ports

    # -- life cycle ----------------------------------------------------------
    def start(self) -> str:
        """Start every node that does not run, wait until each has registered; return the bootstrap list.

        All are launched before any is waited for: a node answers only once a majority of controllers runs.
        """
        with self._lock():
            layout = self._ensure_layout()
            launched: list[tuple[ClusterNode, BrokerState, int | None, bool]] = []
            try:
                for node in self.nodes:
                    launched.append((node, *node.launch()))
                for node, state, pid, spawned in launched:
                    node.settle(state, pid, spawned=spawned)
            except BaseException:
                for _, _, pid, spawned in launched:
                    if spawned and pid is not None:
                        send_signal(pid, signal.SIGKILL)
                raise
            return layout.bootstrap()

    def start_node(self, node_id: int) -> str:
        """Start one node (after a kill, say) and wait until it has registered; its address."""
        with self._lock():
            self._ensure_layout()
            return self.node(node_id).start()

    def stop(self) -> bool:
        """Controlled shutdown of every node at once (a node stopped alone after the others would find no quorum to
        grant its controlled shutdown, and wait for the SIGKILL). False if none ran."""
        with self._lock(), ThreadPoolExecutor(self.size) as pool:
            return any(list(pool.map(ClusterNode.stop, self.nodes)))

    def stop_node(self, node_id: int) -> bool:
        """Controlled shutdown of one node; the others keep running."""
        return self.node(node_id).stop()

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: the crash a fault test wants."""
        self.node(node_id).kill()

    # -- internals -----------------------------------------------------------
    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.home)

    def _ensure_layout(self) -> ClusterLayout:
        """The recorded layout, or a new one: a cluster id and two free ports per node."""
        layout = self.layout()
        if layout is not None:
            if self._size is not None and self._size != layout.size:
                raise LocalKafkaError(
                    f"the cluster in {self.home} has {layout.size} nodes, not {self._size}; remove it to start afresh"
                )
            return layout
        size = self._size or DEFAULT_SIZE
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        ports: list[int] = []
        while len(ports) < 2 * size:
            port = free_port()
            if port not in ports:
                ports.append(port)
        layout = ClusterLayout(new_cluster_id(), tuple(zip(ports[0::2], ports[1::2], strict=True)))
        write_private(self._layout_file, json.dumps({"cluster_id": layout.cluster_id, "ports": layout.ports}))
        return layout
