"""Starting budgetflow workers as child processes with settings of their own (bench and demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["WorkerProcess", "worker_env"]


def worker_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its BUDGETFLOW_ variables, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env.update(settings_env)
    return env


class WorkerProcess:
    """One `budgetflow worker --role ROLE` child, logging to a file."""

    def __init__(self, role: str, env: Mapping[str, str], log: Path) -> None:
        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "budgetflow.streams", "worker", "--role", role],
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait(timeout=10)
