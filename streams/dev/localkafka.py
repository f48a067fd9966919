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
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings
from budgetflow.streams.dev.securekafka import SecureDir, write_private

__all__ = ["DEFAULT_PORT", "KafkaJars", "LocalKafka", "free_port"]

DEFAULT_PORT = 9092
# Every process that writes into the data dir: files 0600, directories 0700.
_UMASK = 0o077


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child not yet reaped) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _make_private(root: Path) -> None:
    """Directories 0700 and files 0600 under ``root`` (symbolic links are left alone)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError):
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode) and stat.S_IMODE(mode) != 0o700:
                    os.chmod(path, 0o700)
                elif stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
                    os.chmod(path, stat.S_IMODE(mode) & 0o700)
    os.chmod(root, 0o700)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LocalKafkaError(f"`{name}` is not on PATH; the local broker needs a JDK 17+ and Maven")
    return path


def _pom_template() -> str:
    return resources.files("budgetflow.streams.dev").joinpath("kafka-local/pom.xml").read_text()


@dataclass(frozen=True)
class KafkaJars:
    """The broker's runtime jars, fetched once from Maven Central into a cache dir."""

    version: str
    cache_dir: Path

    @classmethod
    def from_settings(cls, settings: LocalKafkaSettings) -> KafkaJars:
        base = settings.cache_dir
        if base is None:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetflow"
        # The cache is keyed by the POM too: a jar added to it is fetched, not missed in an old cache.
        digest = hashlib.sha256(_pom_template().encode()).hexdigest()[:8]
        return cls(settings.version, base / f"kafka-{settings.version}-{digest}")

    @property
    def lib(self) -> Path:
        return self.cache_dir / "lib"

    def ensure(self) -> Path:
        """Fetch the jars unless a complete copy is cached; return the lib dir."""
        done = self.cache_dir / ".complete"
        if done.exists():
            return self.lib
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        pom = self.cache_dir / "pom.xml"
        pom.write_text(_pom_template().replace("@KAFKA_VERSION@", self.version))
        staging = self.cache_dir / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            _tool("mvn"),
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise LocalKafkaError(f"Maven could not fetch Apache Kafka {self.version}: {' | '.join(tail)}")
        if not any(staging.glob("kafka_2.13-*.jar")):
            raise LocalKafkaError(f"Maven ran but no kafka_2.13 jar is in {staging}")
        shutil.rmtree(self.lib, ignore_errors=True)
        staging.rename(self.lib)
        done.write_text(self.version + "\n")
        return self.lib


@dataclass(frozen=True)
class _State:
    cluster_id: str
    port: int
    controller_port: int
    secure_dir: str | None = None


class LocalKafka:
    """One broker, one data dir: ``start`` is idempotent, ``stop`` is controlled, ``kill`` is a crash."""

    def __init__(
        self,
        data_dir: Path,
        settings: LocalKafkaSettings | None = None,
        *,
        secure_dir: Path | None = None,
        topic_prefix: str = "budgetflow.",
    ) -> None:
        self.settings = settings or LocalKafkaSettings()
        self.home = Path(data_dir).resolve() / "kafka"
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
        return pid if _pid_alive(pid) else None

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
            if self.pid() is not None:
                state = self._load_state()
                assert state is not None
                self._wait_ready(state, self.pid())
                return f"127.0.0.1:{state.port}"
            lib = self.jars.ensure()
            state = self._prepare()
            pid = self._spawn(lib, state)
            try:
                self._wait_ready(state, pid)
                self._grant(state)
            except BaseException:
                self._signal(pid, signal.SIGKILL)
                raise
            return f"127.0.0.1:{state.port}"

    def stop(self) -> bool:
        """Controlled shutdown (SIGTERM, then SIGKILL after the timeout). False if none ran."""
        with self._lock():
            pid = self.pid()
            if pid is None:
                self._pid_file.unlink(missing_ok=True)
                return False
            self._signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, self.settings.stop_timeout_s):
                self._signal(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
            self._pid_file.unlink(missing_ok=True)
            return True

    def kill(self) -> None:
        """SIGKILL the broker: the crash a fault test wants."""
        pid = self.pid()
        if pid is not None:
            self._signal(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)

    # -- internals -----------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.home.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.home, 0o700)
        fd = os.open(self.home / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load_state(self) -> _State | None:
        try:
            raw = json.loads(self._state_file.read_text())
            return _State(str(raw["cluster_id"]), int(raw["port"]), int(raw["controller_port"]), raw.get("secure_dir"))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalKafkaError(f"{self._state_file} is damaged ({exc}); remove {self.home} to start afresh") from exc

    def _prepare(self) -> _State:
        """Choose ports, write the configs and format the storage on first use."""
        previous = self._load_state()
        wanted = self.settings.port
        if previous is not None and wanted in (None, 0, previous.port):
            port = previous.port
        elif wanted is None:
            port = DEFAULT_PORT
        else:
            port = wanted or free_port()
        if _port_open(port):
            raise LocalKafkaError(f"port {port} is in use by another program; choose another with --port")
        controller = previous.controller_port if previous else free_port()
        if _port_open(controller) or controller == port:
            controller = free_port()
        cluster_id = previous.cluster_id if previous else self._new_cluster_id()
        formatted = (self.log_dir / "meta.properties").exists()
        secure = self.secure
        was_secure = previous is not None and previous.secure_dir is not None
        if formatted and secure is not None and not was_secure:
            raise LocalKafkaError(f"{self.home} was formatted without --secure; remove it to start a secure broker")
        if secure is not None:
            secure.ensure()
        state = _State(cluster_id, port, controller, str(secure.path) if secure else None)

        (self.home / "logs").mkdir(mode=0o700, exist_ok=True)
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        _make_private(self.home)  # the broker is down: a dir an older version left readable is tightened
        # On a secure broker server.properties holds the broker's own SCRAM password.
        write_private(self.home / "server.properties", self._server_properties(state))
        template = resources.files("budgetflow.streams.dev").joinpath("kafka-local/log4j2.properties").read_text()
        write_private(self.home / "log4j2.properties", template.replace("@LOG_DIR@", str(self.home / "logs")))
        if not formatted:
            self._format(cluster_id, secure)
        write_private(self._state_file, json.dumps(state.__dict__))
        return state

    @staticmethod
    def _new_cluster_id() -> str:
        # KRaft wants 16 random bytes as URL-safe base64 without padding; it
        # rejects a leading '-', which the command line would read as a flag.
        while True:
            cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
            if not cid.startswith("-"):
                return cid

    def _server_properties(self, state: _State) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{state.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{state.port},CONTROLLER://127.0.0.1:{state.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{state.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "1",
            # Single node: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # An auto-created compacted topic would silently be a delete topic.
            "auto.create.topics.enable": "false",
            # Lets clients use short session timeouts, so a killed worker's partitions move in seconds.
            "group.min.session.timeout.ms": "3000",
            "log.retention.check.interval.ms": "5000",
            "log.cleaner.backoff.ms": "1000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
        }
        if state.secure_dir:
            props.update(SecureDir(Path(state.secure_dir)).server_properties(state.port, state.controller_port))
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def _java(self) -> str:
        home = os.environ.get("JAVA_HOME")
        if home and (Path(home) / "bin" / "java").exists():
            return str(Path(home) / "bin" / "java")
        return _tool("java")

    def _jvm_flags(self) -> list[str]:
        heap = self.settings.heap_mb
        gc = ["-XX:+UseSerialGC"] if self.settings.jvm_gc == "serial" else ["-XX:+UseG1GC"]
        return [
            f"-Xms{min(256, heap)}m",
            f"-Xmx{heap}m",
            *gc,
            "-Djava.net.preferIPv4Stack=true",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
        ]

    def _format(self, cluster_id: str, secure: SecureDir | None) -> None:
        cmd = [
            self._java(),
            *self._jvm_flags(),
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
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, umask=_UMASK)
        finally:
            argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise LocalKafkaError(f"formatting the broker storage failed: {(proc.stdout + proc.stderr).strip()[-400:]}")

    def _spawn(self, lib: Path, state: _State) -> int:
        cmd = [self._java(), *self._jvm_flags(), "-cp", f"{lib}/*", "kafka.Kafka", str(self.home / "server.properties")]
        out = os.fdopen(os.open(self.home / "logs" / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        # A session of its own: the broker outlives the command that started it,
        # and Ctrl-C in the starting terminal does not reach it.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, umask=_UMASK
        )
        out.close()
        write_private(self._pid_file, f"{proc.pid}\n")
        return proc.pid

    def _wait_ready(self, state: _State, pid: int | None) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        address = f"127.0.0.1:{state.port}"
        while time.monotonic() < deadline:
            if pid is None or not _pid_alive(pid):
                raise LocalKafkaError(f"the broker exited during start-up; see {self.server_log}:\n{self._log_tail()}")
            if _port_open(state.port) and asyncio.run(_lists_broker(address, self._admin_options(state))):
                return
            time.sleep(0.2)
        raise LocalKafkaError(
            f"the broker did not become ready in {self.settings.start_timeout_s:.0f} s; see {self.server_log}"
        )

    def _admin_options(self, state: _State) -> dict[str, Any]:
        if not state.secure_dir:
            return {}
        from budgetflow.schemas.settings import KafkaSettings
        from budgetflow.streams.kafka.clients import client_options

        secure = SecureDir(Path(state.secure_dir))
        env = secure.env("admin", f"127.0.0.1:{state.port}")
        security = {
            k.removeprefix("BUDGETFLOW_KAFKA__SECURITY__").lower(): v
            for k, v in env.items()
            if k.startswith("BUDGETFLOW_KAFKA__SECURITY__")
        }
        options = client_options(KafkaSettings(security=security))  # type: ignore[arg-type]
        for key in ("bootstrap_servers", "request_timeout_ms", "client_id"):
            options.pop(key)
        return options

    def _grant(self, state: _State) -> None:
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
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, umask=_UMASK)
            if proc.returncode != 0:
                raise LocalKafkaError(f"setting ACLs failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
        write_private(marker, json.dumps(sorted(granted | {self.topic_prefix})))

    def _log_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.server_log, self.home / "logs" / "stdout.log"):
            with contextlib.suppress(OSError):
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    @staticmethod
    def _wait_exit(pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            # Reap it if it is our child (tests start it in-process).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        return not _pid_alive(pid)


async def _lists_broker(address: str, options: dict[str, Any]) -> bool:
    """True when a metadata request answers and lists broker 1."""
    admin = AIOKafkaAdminClient(bootstrap_servers=address, **{"request_timeout_ms": 3000, **options})
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return any(b["node_id"] == 1 for b in cluster.get("brokers", []))
    except Exception:  # noqa: BLE001  # not ready yet: any client error means "try again"
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
