"""A newcomer's first commands with no broker, or with a bad setting: one line naming the problem, a clear exit
status, within seconds; no traceback, no "Unclosed AIOKafka..." noise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = str(Path(sys.executable).with_name("budgetflow"))
POLICY = 'budgets:\n  - id: "team:a"\n    monthly_limit_usd: "10"\n'

# Every command that talks to Kafka once and exits, with arguments that are otherwise right.
KAFKA_COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "audit": ["audit"],
    "report": ["report"],
    "ledger adjust": ["ledger", "adjust", "team:a", "-1.00", "--period", "2026-11", "--reason", "credit"],
    "topics create": ["topics", "create"],
    "policy apply": ["policy", "apply", "{policy}"],
    "view serve": ["view", "serve", "--port", "0"],
}
# The rest: no Kafka (settings, schema, simulate), their own broker (kafka, demo, bench, litellm), or they wait for one
# (worker and notify retry the broker, as a service does).
OTHER_COMMANDS = {
    "settings",
    "schema export",
    "simulate shift",
    "kafka start",
    "kafka stop",
    "kafka status",
    "demo",
    "bench",
    "litellm",
    "worker",
    "notify",
}
TIMELY_S = 8.0  # Python's start and the command's imports on a busy 2-core machine; a broker-less answer is ms


def leaf_commands() -> set[str]:
    """Every command `budgetflow --help` leads to, as "group sub"."""
    import click

    from budgetflow.streams.cli import cli

    found: set[str] = set()

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        else:
            found.add(" ".join(path))

    walk(cli, [])
    return found


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: what a firewalled or hung broker looks like."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def run(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    base = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    base.update(BUDGETFLOW_DATA_DIR=str(tmp_path / "data"), **env)
    began = time.monotonic()
    proc = subprocess.run(
        [SCRIPT, *(a.format(policy=policy) for a in args)], capture_output=True, text=True, env=base, timeout=60
    )
    return proc, time.monotonic() - began


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Unclosed" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_every_command_is_either_checked_here_or_needs_no_broker_of_ours() -> None:
    assert leaf_commands() == set(KAFKA_COMMANDS) | OTHER_COMMANDS


@pytest.mark.parametrize("name", sorted(KAFKA_COMMANDS))
def test_no_broker_is_one_line_and_exit_status_1(name: str, tmp_path: Path, closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    proc, took = run(KAFKA_COMMANDS[name], tmp_path, BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS=address)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc)
    assert f"no Kafka broker answers at {address}" in line
    assert "budgetflow kafka start" in line
    assert "make run" in line
    assert "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS" in line
    assert proc.stdout == ""
    assert took < TIMELY_S, f"{name} took {took:.1f} s to say there is no broker"


@pytest.mark.parametrize("name", sorted(KAFKA_COMMANDS))
def test_a_bad_setting_is_one_line_and_exit_status_2(name: str, tmp_path: Path, closed_port: int) -> None:
    proc, took = run(
        KAFKA_COMMANDS[name],
        tmp_path,
        BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}",
        BUDGETFLOW_WEB__PORT="notanumber",
    )
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    assert "BUDGETFLOW_WEB__PORT" in line
    assert "Kafka" not in line, "the setting is the problem, not the broker"
    assert took < TIMELY_S


def test_a_broker_that_never_answers_is_given_up_within_seconds(tmp_path: Path, silent_port: int) -> None:
    address = f"127.0.0.1:{silent_port}"
    proc, took = run(["status"], tmp_path, BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS=address)
    assert proc.returncode == 1, proc.stderr
    assert f"no Kafka broker answers at {address}" in one_line(proc)
    # A CLI command's connect timeout is a few seconds, not the client's 30 s request timeout.
    assert took < 15, f"waited {took:.1f} s for a broker that does not answer"
