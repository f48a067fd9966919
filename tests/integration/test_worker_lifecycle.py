"""Workers start, fail and stop as an operator expects: a configuration error exits at once with one line, and
a stop is bounded whatever the broker does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit status within ``timeout_s``, else None (the process is left running)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def wait_for_line(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _spawn(pipeline: Any, role: str, env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = pipeline.root / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetflow.streams", "worker", "--role", role],
        env={**pipeline.env_base, "BUDGETFLOW_DATA_DIR": str(pipeline.root / name), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


@pytest.mark.parametrize(("role", "setting"), [("aggregate", "WEB__PORT"), ("enrich", "METRICS__PORT")])
async def test_a_port_in_use_exits_at_once_with_one_line(
    pipeline_factory: Any, kit: Any, held_port: int, role: str, setting: str
) -> None:
    pipeline, _ = await kit.start(pipeline_factory, n=10)
    proc, log = _spawn(pipeline, role, {f"BUDGETFLOW_{setting}": str(held_port)}, f"{role}-port")
    code = wait_exit(proc, 60)
    text = log.read_text(errors="replace")
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
    assert code == 2, text
    assert f"cannot listen on 127.0.0.1:{held_port}" in text
    assert f"BUDGETFLOW_{setting}" in text
    assert "lost the broker" not in text
    assert "Traceback" not in text


async def test_role_all_stops_its_other_worker_when_one_cannot_start(
    pipeline_factory: Any, kit: Any, held_port: int
) -> None:
    pipeline, _ = await kit.start(pipeline_factory, n=10)
    proc, log = _spawn(pipeline, "all", {"BUDGETFLOW_METRICS__PORT": str(held_port)}, "all-port")
    code = wait_exit(proc, 90)
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
    assert code == 2, log.read_text(errors="replace")
    # Nothing of the group is left: the aggregate was stopped, not orphaned.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


@pytest.fixture
def own_broker(tmp_path: Path, budgetflow_cli: Callable[..., list[str]]) -> Iterator[tuple[str, int]]:
    """A broker of this test's own (it will be frozen): (bootstrap, pid)."""
    data = tmp_path / "frozen-broker"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    proc = subprocess.run(
        budgetflow_cli("kafka", "start", "--data-dir", str(data), "--port", "0"),
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    (pid_file,) = data.rglob("kafka.pid")
    pid = int(pid_file.read_text().strip())
    try:
        yield proc.stdout.strip(), pid
    finally:
        os.kill(pid, signal.SIGCONT)
        subprocess.run(budgetflow_cli("kafka", "stop", "--data-dir", str(data)), env=env, check=False, timeout=90)


@pytest.mark.parametrize("role", ["aggregate", "enrich"])
async def test_sigterm_while_the_broker_is_unreachable_exits_within_the_shutdown_timeout(
    pipeline_factory: Any, kit: Any, own_broker: tuple[str, int], role: str
) -> None:
    bootstrap, broker_pid = own_broker
    pipeline = pipeline_factory(bootstrap=bootstrap, clock_start=kit.START.isoformat(), speed=kit.SPEED)
    assert pipeline.cli("topics", "create").returncode == 0
    proc, log = _spawn(pipeline, role, {"BUDGETFLOW_WORKER__SHUTDOWN_TIMEOUT_S": "5"}, f"{role}-frozen")
    try:
        wait_for_line(log, f"{role} worker started", 120)
        if role == "aggregate":
            wait_for_line(log, "ready:", 60)
        os.kill(broker_pid, signal.SIGSTOP)  # the broker stops answering; its connections stay open
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, 60)
        took = time.monotonic() - began
    finally:
        os.kill(broker_pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code is not None, f"no exit within 60 s of SIGTERM:\n{log.read_text(errors='replace')[-2000:]}"
    assert took < 5 + 2 + 10, (took, log.read_text(errors="replace")[-2000:])  # the timeout, the cancel, slack
