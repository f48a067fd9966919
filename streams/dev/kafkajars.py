"""Apache Kafka's runtime jars, fetched once from Maven Central through Maven into a cache dir.

The cache is ``LOCAL_KAFKA__CACHE_DIR``, else ``$XDG_CACHE_HOME/budgetflow`` (``~/.cache/budgetflow``); a copy is
used only once complete, and it is keyed by Kafka's version and the POM, so a changed POM fetches afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from budgetflow.schemas.errors import LocalKafkaError
from budgetflow.schemas.settings import LocalKafkaSettings

__all__ = ["KafkaJars", "require_tool", "resource_text"]


def require_tool(name: str) -> str:
    """The path of a program the local broker needs, or a clear error."""
    path = shutil.which(name)
    if path is None:
        raise LocalKafkaError(f"`{name}` is not on PATH; the local broker needs a JDK 17+ and Maven")
    return path


def resource_text(name: str) -> str:
    """A file of the package's kafka-local/ folder (the POM, the log4j2 template)."""
    return resources.files("budgetflow.streams.dev").joinpath(f"kafka-local/{name}").read_text()


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
        digest = hashlib.sha256(resource_text("pom.xml").encode()).hexdigest()[:8]
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
        pom.write_text(resource_text("pom.xml").replace("@KAFKA_VERSION@", self.version))
        staging = self.cache_dir / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            require_tool("mvn"),
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
