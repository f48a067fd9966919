"""Starting budgetflow workers as child processes (``budgetflow worker --role all``, the demo, the bench and the
tests): the one way a worker process is spawned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

__all__ = ["ChildProcess", "WorkerProcess", "die_with_parent", "log_tail", "spawn_worker", "worker_env"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies, even by SIGKILL.

    So no worker outlives the process that started it (an orphan would hold its ports and its partitions).
    Linux only; elsewhere None.
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def worker_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its BUDGETFLOW_ variables, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env.update(settings_env)
    return env


def spawn_worker(
    role: str, env: Mapping[str, str] | None = None, stdout: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """``budgetflow worker --role ROLE`` as a child of this process that dies with it; its output to ``stdout``
    (stderr too) when given, else inherited."""
    return subprocess.Popen(
        [sys.executable, "-m", "budgetflow.streams", "worker", "--role", role],
        env=None if env is None else dict(env),
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),  # noqa: PLW1509  # no threads yet in the processes that launch workers
    )


class ChildProcess:
    """A child process of this one: alive, stopped with a grace, or killed."""

    proc: subprocess.Popen[bytes]

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


class WorkerProcess(ChildProcess):
    """One `budgetflow worker --role ROLE` child, logging to a file."""

    def __init__(self, role: str, env: Mapping[str, str], log: Path) -> None:
        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = spawn_worker(role, env, out)


def log_tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of a child process's log ("" when it cannot be read): what an error shows of it."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
