"""A real single-node Apache Kafka (KRaft) on 127.0.0.1 for development, tests and the demo.

The broker's jars come from Maven Central through Maven (cached, so the second
start is fast); the broker runs as a detached JVM whose data dir survives a
stop and a start. No Docker, no mock: this is Apache Kafka itself.

The data dir is private: the log holds prompt text (the requests topic) and, on a
secure broker, ``server.properties`` holds the broker's SCRAM password. Its
directories are 0700 and its files 0600; the JVMs run with umask 077, so every
segment Kafka writes is born private, and a start tightens a dir left looser by
an older version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.kafkaconfig import (
    BrokerState,
    admin_options,
    jvm_flags,
    new_cluster_id,
    server_properties,
)
from budgetflow.streams.dev.kafkajars import KafkaJars, require_tool, resource_text
from budgetflow.streams.dev.localhost import (
    UMASK,
    free_port,
    locked,
    make_private,
    pid_alive,
    port_open,
    send_signal,
    wait_exit,
)
from budgetflow.streams.dev.securekafka import SecureDir, write_private

# KafkaJars and free_port are imported from here by callers that know the broker only.
__all__ = ["DEFAULT_PORT", "KafkaJars", "LocalKafka", "free_port"]

DEFAULT_PORT = 9092


class LocalKafka:
    """One broker, one data dir: ``start`` is idempotent, ``stop`` is controlled, ``kill`` is a crash."""

    # The broker's node.id; a node of a local cluster (localcluster.ClusterNode) has its own.
    node_id = 1

    def __init__(
        self,
        data_dir: Path,
        settings: LocalKafkaSettings | None = None,
        *,
        secure_dir: Path | None = None,
        topic_prefix: str = "budgetflow.",
        subdir: str = "kafka",
    ) -> None:
        self.settings = settings or LocalKafkaSettings()
        self.home = Path(data_dir).resolve() / subdir
        self.jars = KafkaJars.from_settings(self.settings)
        self._secure_dir = Path(secure_dir).resolve() if secure_dir else None
        self.topic_prefix = topic_prefix

    @property
    def secure(self) -> SecureDir | None:
        """The TLS/SCRAM material if this broker runs secure (asked now, or when its storage was formatted)."""
        if self._secure_dir is not None:
            return SecureDir(self._secure_dir)
        with contextlib.suppress(LocalKafkaError):
            state = self._load_state()
            if state is not None and state.secure_dir:
                return SecureDir(Path(state.secure_dir))
        return None

    # -- paths ---------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def server_log(self) -> Path:
        return self.home / "logs" / "server.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def _state_file(self) -> Path:
        return self.home / "state.json"

    # -- queries -------------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid if it is running."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def bootstrap(self) -> str:
        """The bootstrap address (valid once the broker has been started here)."""
        state = self._load_state()
        if state is None:
            raise LocalKafkaError(f"no broker was ever started in {self.home}")
        return f"127.0.0.1:{state.port}"

    # -- life cycle ----------------------------------------------------------
    def start(self) -> str:
        """Start the broker unless it runs already; wait until it answers; return its address."""
        with self._lock():
            state, pid, spawned = self._launch()
            self._settle(state, pid, spawned=spawned)
            return f"127.0.0.1:{state.port}"

    def stop(self) -> bool:
        """Controlled shutdown (SIGTERM, then SIGKILL after the timeout). False if none ran."""
        with self._lock():
            pid = self.pid()
            if pid is None:
                self._pid_file.unlink(missing_ok=True)
                return False
            send_signal(pid, signal.SIGTERM)
            if not wait_exit(pid, self.settings.stop_timeout_s):
                send_signal(pid, signal.SIGKILL)
                wait_exit(pid, 10)
            self._pid_file.unlink(missing_ok=True)
            return True

    def kill(self) -> None:
        """SIGKILL the broker: the crash a fault test wants."""
        pid = self.pid()
        if pid is not None:
            send_signal(pid, signal.SIGKILL)
            wait_exit(pid, 10)

    # -- internals -----------------------------------------------------------
    def _launch(self) -> tuple[BrokerState, int | None, bool]:
        """Spawn the broker unless it runs (the caller holds the lock): its state, its pid, whether it was spawned.

        Apart from waiting, so that a cluster can launch all its nodes before it waits for any: a node is ready
        only once a quorum of controllers runs.
        """
        pid = self.pid()
        if pid is not None:
            state = self._load_state()
            assert state is not None
            return state, pid, False
        lib = self.jars.ensure()
        state = self._prepare()
        return state, self._spawn(lib, state), True

    def _settle(self, state: BrokerState, pid: int | None, *, spawned: bool) -> None:
        """Wait until the broker answers; set up a freshly spawned one, or kill it if it fails to come up."""
        if not spawned:
            self._wait_ready(state, pid)
            return
        assert pid is not None
        try:
            self._wait_ready(state, pid)
            self._grant(state)
        except BaseException:
            send_signal(pid, signal.SIGKILL)
            raise

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.home)

    def _load_state(self) -> BrokerState | None:
        try:
            raw = json.loads(self._state_file.read_text())
            return BrokerState(
                str(raw["cluster_id"]), int(raw["port"]), int(raw["controller_port"]), raw.get("secure_dir")
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalKafkaError(f"{self._state_file} is damaged ({exc}); remove {self.home} to start afresh") from exc

    def _prepare(self) -> BrokerState:
        """Choose ports, write the configs and format the storage on first use."""
        previous = self._load_state()
        wanted = self.settings.port
        if previous is not None and wanted in (None, 0, previous.port):
            port = previous.port
        elif wanted is None:
            port = DEFAULT_PORT
        else:
            port = wanted or free_port()
        if port_open(port):
            raise LocalKafkaError(f"port {port} is in use by another program; choose another with --port")
        controller = previous.controller_port if previous else free_port()
        if port_open(controller) or controller == port:
            controller = free_port()
        cluster_id = previous.cluster_id if previous else new_cluster_id()
        formatted = (self.log_dir / "meta.properties").exists()
        secure = self.secure
        was_secure = previous is not None and previous.secure_dir is not None
        if formatted and secure is not None and not was_secure:
            raise LocalKafkaError(f"{self.home} was formatted without --secure; remove it to start a secure broker")
        if secure is not None:
            secure.ensure()
        state = BrokerState(cluster_id, port, controller, str(secure.path) if secure else None)
        self._install(state, server_properties(state, self.log_dir), secure)
        return state

    def _install(self, state: BrokerState, properties: str, secure: SecureDir | None) -> None:
        """Write the broker's files (private), format its storage on first use, and remember its state."""
        formatted = (self.log_dir / "meta.properties").exists()
        (self.home / "logs").mkdir(mode=0o700, exist_ok=True)
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        make_private(self.home)  # the broker is down: a dir an older version left readable is tightened
        # On a secure broker server.properties holds the broker's own SCRAM password.
        write_private(self.home / "server.properties", properties)
        template = resource_text("log4j2.properties")
        write_private(self.home / "log4j2.properties", template.replace("@LOG_DIR@", str(self.home / "logs")))
        if not formatted:
            self._format(state.cluster_id, secure)
        write_private(self._state_file, json.dumps(state.__dict__))

    def _java(self) -> str:
        home = os.environ.get("JAVA_HOME")
        if home and (Path(home) / "bin" / "java").exists():
            return str(Path(home) / "bin" / "java")
        return require_tool("java")

    def _format(self, cluster_id: str, secure: SecureDir | None) -> None:
        cmd = [
            self._java(),
            *jvm_flags(self.settings, self.home),
            "-cp",
            f"{self.jars.lib}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.home / "server.properties"),
        ]
        # The SCRAM passwords go through an argument file the tool reads (argparse4j's @FILE, one argument a
        # line): on the command line every user would see them in `ps`.
        argfile = self.home / "format.args"
        try:
            if secure is not None:
                write_private(argfile, "".join(f"{arg}\n" for arg in secure.scram_arguments()))
                cmd.append(f"@{argfile}")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, umask=UMASK)
        finally:
            argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise LocalKafkaError(f"formatting the broker storage failed: {(proc.stdout + proc.stderr).strip()[-400:]}")

    def _spawn(self, lib: Path, state: BrokerState) -> int:
        cmd = [
            self._java(),
            *jvm_flags(self.settings, self.home),
            "-cp",
            f"{lib}/*",
            "kafka.Kafka",
            str(self.home / "server.properties"),
        ]
        out = os.fdopen(os.open(self.home / "logs" / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        # A session of its own: the broker outlives the command that started it,
        # and Ctrl-C in the starting terminal does not reach it.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, umask=UMASK
        )
        out.close()
        write_private(self._pid_file, f"{proc.pid}\n")
        return proc.pid

    def _wait_ready(self, state: BrokerState, pid: int | None) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        address = f"127.0.0.1:{state.port}"
        while time.monotonic() < deadline:
            if pid is None or not pid_alive(pid):
                raise LocalKafkaError(f"the broker exited during start-up; see {self.server_log}:\n{self._log_tail()}")
            if port_open(state.port) and asyncio.run(_lists_broker(address, admin_options(state), self.node_id)):
                return
            time.sleep(0.2)
        raise LocalKafkaError(
            f"the broker did not become ready in {self.settings.start_timeout_s:.0f} s; see {self.server_log}"
        )

    def _grant(self, state: BrokerState) -> None:
        """Set the ACLs of a secure broker for the topic prefix, once (they live in the cluster metadata)."""
        if not state.secure_dir:
            return
        secure = SecureDir(Path(state.secure_dir))
        marker = self.home / "acls.json"
        try:
            granted = set(json.loads(marker.read_text()))
        except (OSError, ValueError):
            granted = set()
        if self.topic_prefix in granted:
            return
        config = self.home / "admin-client.properties"
        write_private(config, secure.client_properties("admin"))
        for args in secure.acl_commands(self.topic_prefix):
            cmd = [
                self._java(),
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp",
                f"{self.jars.lib}/*",
                "org.apache.kafka.tools.AclCommand",
                "--bootstrap-server",
                f"127.0.0.1:{state.port}",
                "--command-config",
                str(config),
                *args,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, umask=UMASK)
            if proc.returncode != 0:
                raise LocalKafkaError(f"setting ACLs failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
        write_private(marker, json.dumps(sorted(granted | {self.topic_prefix})))

    def _log_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.server_log, self.home / "logs" / "stdout.log"):
            with contextlib.suppress(OSError):
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


async def _lists_broker(address: str, options: dict[str, Any], node_id: int = 1) -> bool:
    """True when a metadata request answers and lists broker ``node_id`` (registered with the controllers)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=address, **{"request_timeout_ms": 3000, **options})
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return any(b["node_id"] == node_id for b in cluster.get("brokers", []))
    except Exception:  # noqa: BLE001  # not ready yet: any client error means "try again"
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
