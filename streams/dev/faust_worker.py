"""The Faust app of `budgetflow bench --only faust` as a child process: its venv, its topics, its sums.

faust-streaming pins ``croniter<6`` and budgetflow's dev tools ``croniter==7``: Faust runs in a venv of its own
(:func:`faust_venv`, made once in the user cache by ``make faust-venv``, or the interpreter named by
``BUDGETFLOW_BENCH_FAUST_PYTHON``), started from this file's sibling ``faust_app.py`` by its path. Nothing of
budgetflow imports Faust.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from budgetflow.schemas.serde import loads
from budgetflow.schemas.settings import Settings
from budgetflow.streams.kafka.clients import client_options
from budgetflow.streams.service.launch import ChildProcess, die_with_parent, log_tail

__all__ = [
    "APP",
    "FAUST_REQUIREMENT",
    "FaustWorker",
    "faust_python",
    "faust_settles_seen",
    "faust_sums",
    "faust_topics",
    "faust_venv",
]

# The `bench-faust` extra of pyproject.toml says the same (tests/unit/test_bench_faust.py holds them together).
FAUST_REQUIREMENT = "faust-streaming==0.15.3"
APP = Path(__file__).with_name("faust_app.py")


def faust_venv() -> Path:
    """The venv Faust runs in: ``<user cache>/budgetflow/faust-streaming-0.15.3/``, with budgetflow's aiokafka."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "budgetflow" / FAUST_REQUIREMENT.replace("==", "-")


def faust_python(create: bool = True) -> Path:
    """An interpreter that imports Faust: ``BUDGETFLOW_BENCH_FAUST_PYTHON``, or the venv's (made when missing and
    ``create``). Raises RuntimeError when there is none."""
    given = os.environ.get("BUDGETFLOW_BENCH_FAUST_PYTHON")
    python = Path(given) if given else faust_venv() / "bin" / "python"
    if _imports_faust(python):
        return python
    if given or not create:
        raise RuntimeError(f"{python} does not import faust (make faust-venv, or pip install '{FAUST_REQUIREMENT}')")
    import aiokafka

    venv = faust_venv()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pins = [FAUST_REQUIREMENT, f"aiokafka=={aiokafka.__version__}"]  # the Kafka client budgetflow runs on
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins]
    done = subprocess.run(pip, check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not _imports_faust(python):
        raise RuntimeError(f"could not install {FAUST_REQUIREMENT} into {venv}: {done.stderr.strip()[-500:]}")
    return python


def _imports_faust(python: Path) -> bool:
    if not python.exists():
        return False
    probe = [str(python), "-c", "import faust"]
    return subprocess.run(probe, check=False, capture_output=True, timeout=120).returncode == 0


class FaustWorker(ChildProcess):
    """One `faust_app.py worker` child of this process, logging to a file, its progress in a JSON file."""

    def __init__(
        self, python: Path, bootstrap: str, app_id: str, topic: str, root: Path, target: int = 0, take: int = 0
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / f"{app_id}.log"
        self.progress_file = root / f"{app_id}-progress.json"
        self.progress_file.unlink(missing_ok=True)
        env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
            "FAUST_BENCH_BROKER": bootstrap,
            "FAUST_BENCH_APP_ID": app_id,
            "FAUST_BENCH_TOPIC": topic,
            "FAUST_BENCH_TARGET": str(target),
            "FAUST_BENCH_TAKE": str(take),
            "FAUST_BENCH_PROGRESS": str(self.progress_file),
            "FAUST_BENCH_DATADIR": str(root / f"{app_id}-data"),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(python), str(APP), "worker", "--loglevel", "warn"],
                env=env,
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),  # noqa: PLW1509  # the bench starts no threads before this
            )

    def progress(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            found: dict[str, Any] = loads(self.progress_file.read_bytes())
            return found
        return {"processed": 0, "first_at": None, "target_at": None}

    def failure(self) -> str | None:
        """Why the worker does no more work, if it does none: it exited, or its agent crashed (Faust logs the
        crash and keeps the process up, idle)."""
        if not self.alive:
            return f"exited: {log_tail(self.log, 3)}"
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                if "Crashed reason=" in line:
                    return line[line.index("Crashed reason=") :][:300]
        return None


async def faust_topics(settings: Settings, app_id: str) -> None:
    """The changelogs of the Faust app's tables, made before it starts as budgetflow's topics are (a worker that
    creates them itself may write before its metadata knows them: PartitionsMismatch, and its agent is gone)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        compact = {"cleanup.policy": "compact"}
        partitions = settings.topics.partitions
        await admin.create_topics([NewTopic(f"{app_id}-{t}-changelog", partitions, 1, topic_configs=compact)
                                   for t in ("requests", "spend")])  # fmt: skip
    finally:
        await admin.close()
    from budgetflow.streams.kafka.topics import topic_partitions

    for table in ("requests", "spend"):  # until the broker answers for them
        await topic_partitions(settings, f"{app_id}-{table}-changelog", wait_s=30)


async def faust_sums(settings: Settings, app_id: str) -> dict[str, tuple[int, int, int]]:
    """Per budget, (settled, reserved, settles) as the Faust app's spend table holds them (its changelog)."""
    from budgetflow.streams.kafka.follow import read_topic

    sums: dict[str, tuple[int, int, int]] = {}
    for _, key, value, _ in await read_topic(settings, f"{app_id}-spend-changelog"):
        if key is not None and value is not None:
            settled, reserved, settles = loads(value)
            sums[key.decode().strip('"').split("|")[0]] = (settled, reserved, settles)
    return sums


async def faust_settles_seen(settings: Settings, app_id: str) -> dict[str, int]:
    """Per budget, how many settles the Faust app's dedupe table (``requests``) says it has counted."""
    from budgetflow.streams.kafka.follow import read_topic

    seen: dict[str, set[str]] = {}
    for _, key, value, _ in await read_topic(settings, f"{app_id}-requests-changelog"):
        if key is not None and value is not None and loads(value)[1] is not None:
            budget, request = key.decode().strip('"').split("|", 1)
            seen.setdefault(budget, set()).add(request)
    return {budget: len(requests) for budget, requests in seen.items()}


if __name__ == "__main__":  # `make faust-venv`: the venv made ahead, for the tests
    print(faust_python())  # noqa: T201
